"""Data: readers and their errors, the embedded stdlib corpus, tokenizers, features, collators."""

import json

import pytest
import torch

from pyllm import data as D
from pyllm.data import stdlib

from .conftest import words_corpus


# -- readers ------------------------------------------------------------------------------

def test_read_texts_file_folder_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    (tmp_path / "ignored.md").write_text("not read")
    assert D.read_texts(tmp_path) == ["first document", "second", "third"]
    assert D.read_texts(tmp_path / "a.txt") == ["first document"]


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(D.DataError, match="holds no text"):
        D.read_texts(tmp_path / "empty.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: not valid JSON"):
        D.read_texts(bad)
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: expected a string field 'text'"):
        D.read_texts(bad)
    (tmp_path / "folder").mkdir()
    with pytest.raises(D.DataError, match="no .txt or .jsonl"):
        D.read_texts(tmp_path / "folder")


def test_read_labelled_jsonl_csv_and_label_set(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": 1, "text_pair": "c"}\n')
    assert D.read_labelled(j) == [{"text": "a", "label": "x"}, {"text": "b", "label": "1", "text_pair": "c"}]
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"hello, world",pos\nbye,neg\n')
    assert [r["label"] for r in D.read_labelled(c)] == ["pos", "neg"]
    with pytest.raises(D.DataError, match=r"d.csv:3: label 'neg' is not in the label set \[pos\]"):
        D.read_labelled(c, labels=["pos"])
    j.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(D.DataError, match=r"d.jsonl:2: missing field 'label'"):
        D.read_labelled(j)
    c.write_text("sentence,label\nhi,pos\n")
    with pytest.raises(D.DataError, match="lacks the column"):
        D.read_labelled(c)
    with pytest.raises(D.DataError, match="expected a .jsonl or .csv"):
        (tmp_path / "d.txt").write_text("x")
        D.read_labelled(tmp_path / "d.txt")


def test_read_conll(tmp_path):
    p = tmp_path / "t.conll"
    p.write_text("-DOCSTART- O\n\nAlice NNP B-PER\nruns VBZ O\n\nBob B-PER\n")
    assert D.read_conll(p) == [{"tokens": ["Alice", "runs"], "tags": ["B-PER", "O"]},
                               {"tokens": ["Bob"], "tags": ["B-PER"]}]
    p.write_text("Alice B-PER\nlonely\n")
    with pytest.raises(D.DataError, match=r"t.conll:2: expected 'token ... tag'"):
        D.read_conll(p)
    p.write_text("Alice B-LOC\n")
    with pytest.raises(D.DataError, match=r"t.conll:1: label 'B-LOC' is not in the label set"):
        D.read_conll(p, labels=["O", "B-PER"])


def test_read_squad(tmp_path, squad_file):
    qs = D.read_squad(squad_file)
    assert len(qs) == 40 and qs[0]["answers"][0]["text"] == "red"
    bad = {"data": [{"paragraphs": [{"context": "abc def", "qas": [
        {"id": "q1", "question": "?", "answers": [{"text": "def", "answer_start": 0}]}]}]}]}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(D.DataError, match="question q1: answer 'def' is not at offset 0"):
        D.read_squad(p)
    p.write_text("{not json")
    with pytest.raises(D.DataError, match="not valid JSON"):
        D.read_squad(p)


# -- collators ----------------------------------------------------------------------------

def test_pad_batch_masks_and_labels():
    b = D.pad_batch([{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": [1, -100, 2]},
                     {"input_ids": [8], "token_type_ids": [0], "labels": [3]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert b["labels"].tolist() == [[1, -100, 2], [3, -100, -100]]
    b = D.pad_batch([{"input_ids": [1, 2], "labels": 4}, {"input_ids": [3], "labels": 0}], pad_id=9)
    assert b["labels"].tolist() == [4, 0] and b["input_ids"].tolist() == [[1, 2], [3, 9]]
    with pytest.raises(ValueError, match="empty"):
        D.pad_batch([], 0)


def test_mask_tokens_rates_and_specials():
    ids = torch.randint(5, 1000, (64, 256))
    ids[:, 0] = 2  # [CLS]
    ids[:, -1] = 3  # [SEP]
    g = torch.Generator().manual_seed(0)
    masked, labels = D.mask_tokens(ids, mask_id=4, vocab_size=1000, special_ids=[0, 1, 2, 3, 4], generator=g)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, -1].any()  # specials are never picked
    assert abs(picked.float().mean().item() - 0.15 * 254 / 256) < 0.01
    assert (labels[picked] == ids[picked]).all()
    as_mask = (masked == 4) & picked
    kept = (masked == ids) & picked
    n = picked.sum().item()
    assert abs(as_mask.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # (a random replacement may hit the same id: rare)
    assert (masked[~picked] == ids[~picked]).all()  # unpicked tokens are untouched
    again = D.mask_tokens(ids, mask_id=4, vocab_size=1000, special_ids=[0, 1, 2, 3, 4],
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


def test_pack_blocks():
    blocks = D.pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    with pytest.raises(ValueError, match="fewer than one block"):
        D.pack_blocks([[1, 2]], 8)


# -- tokenizers and features --------------------------------------------------------------

@pytest.fixture(scope="module")
def wordpiece():
    return D.train_wordpiece(words_corpus() + ["What color is the file? red blue green black"], 300)


def test_tokenizers_train_save_load(tmp_path, wordpiece):
    bpe = D.train_bpe(words_corpus(), 300)
    assert bpe.vocab_size <= 300 and bpe.eos_token_id == 0 and bpe.mask_token_id is None
    assert bpe.pad_token_id == bpe.eos_token_id  # GPT-style: EOS pads
    text = "The parser reads the file."
    assert bpe.decode(bpe.encode(text)) == text  # byte-level: lossless
    bpe.save_pretrained(tmp_path / "bpe")
    again = D.load_tokenizer(tmp_path / "bpe")
    assert type(again) is type(bpe) and again.encode(text) == bpe.encode(text)
    assert again.pad_token_id == bpe.pad_token_id and again.eos_token_id == bpe.eos_token_id
    assert wordpiece.mask_token_id == 4 and wordpiece.pad_token_id == 0
    enc = wordpiece.encode_batch(["the file"], ["the value"])[0]
    assert enc.tokens[0] == "[CLS]" and enc.tokens.count("[SEP]") == 2 and enc.type_ids[-1] == 1
    batch = wordpiece(["the file", "the parser reads the value"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert wordpiece.batch_decode(batch["input_ids"]) == ["the file", "the parser reads the value"]
    with pytest.raises(ValueError, match="kind must be"):
        D.train_tokenizer("unigram", ["x"])


def test_one_tokenizer_class():
    """pyllm.models and pyllm.data name the same class and loader (issue 10: one tokenizer)."""
    import pyllm.models as M

    assert M.Tokenizer is D.Tokenizer and M.load_tokenizer is D.load_tokenizer


def test_defect_12_tokenizer_of_an_empty_batch(wordpiece):
    """Issue 11, defect 12: tokenizer([]) is an empty batch of shape (0, 0), not an unrelated error."""
    batch = wordpiece([])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (0, 0), "attention_mask": (0, 0), "token_type_ids": (0, 0)}
    with pytest.raises(TypeError, match=r"tokenizer: texts must be a str or a list of str, got list holding \['int'\]"):
        wordpiece([1, 2])


def test_lm_features_blocks(wordpiece):
    bpe = D.train_bpe(words_corpus(), 300)
    clm = D.lm_features(words_corpus(), bpe, objective="clm", block_size=16)
    assert all(len(f["input_ids"]) == 16 for f in clm)
    mlm = D.lm_features(words_corpus(), wordpiece, objective="mlm", block_size=16)
    assert all(f["input_ids"][0] == wordpiece.cls_token_id and f["input_ids"][-1] == wordpiece.sep_token_id for f in mlm)
    with pytest.raises(ValueError, match="needs a tokenizer with"):
        D.lm_features(words_corpus(), bpe, objective="mlm", block_size=16)


def test_qa_features_map_char_spans_to_tokens(wordpiece, squad_file):
    examples = D.read_squad(squad_file)[:8]
    feats = D.qa_features(examples, wordpiece, max_length=64)
    for f, x in zip(feats, examples):
        s, e = f["start_positions"], f["end_positions"]
        assert 0 < s <= e
        text = x["context"][f["offsets"][s][0]:f["offsets"][e][1]]
        assert text == x["answers"][0]["text"]
    # Context cut before the answer: both positions point at [CLS].
    short = D.qa_features(examples[:1], wordpiece, max_length=12)
    assert short[0]["start_positions"] == short[0]["end_positions"] == 0


def test_token_classification_features_label_first_subword(wordpiece):
    sents = [{"tokens": ["Alice", "reads", "unparseableword"], "tags": ["B-PER", "O", "O"]}]
    f = D.token_classification_features(sents, wordpiece, {"O": 0, "B-PER": 1}, max_length=32)[0]
    kept = [y for y in f["labels"] if y != -100]
    assert kept == [1, 0, 0]
    assert f["labels"][0] == -100 and f["labels"][-1] == -100  # [CLS], [SEP]


def test_classification_features(wordpiece):
    rows = [{"text": "the file", "label": "b"}, {"text": "the value", "label": "a", "text_pair": "x"}]
    f = D.classification_features(rows, wordpiece, {"a": 0, "b": 1}, max_length=8)
    assert [x["labels"] for x in f] == [1, 0] and all(len(x["input_ids"]) <= 8 for x in f)


# -- the embedded stdlib corpus -----------------------------------------------------------

def test_stdlib_corpus_subset_is_cached_and_fixed(monkeypatch, tmp_path):
    monkeypatch.setenv("PYLLM_CACHE", str(tmp_path))
    first = stdlib.stdlib_records(max_files=15)
    assert first and all({"file", "name", "package", "text"} <= set(r) for r in first)
    files = [r["file"] for r in first]
    assert files == sorted(files)  # sorted file order, source order inside a file
    cached = list(tmp_path.glob("stdlib-docstrings-*.jsonl"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))  # atomic: no temp file left behind

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(stdlib, "_records_from_files", boom)
    assert stdlib.stdlib_records(max_files=15) == first
    assert stdlib.stdlib_corpus(max_files=15) == [r["text"] for r in first]
    with pytest.raises(ValueError, match="max_files must be >= 1"):
        stdlib.stdlib_records(max_files=0)


def test_stdlib_docstrings_read_without_import(tmp_path):
    import ast
    src = 'import sys\nsys.exit(3)\n"""not a docstring"""\ndef f():\n    """Return the thing, always and forever."""\n'
    recs = list(stdlib._docstrings(ast.parse(src)))
    assert recs == [("f", "Return the thing, always and forever.")]


def test_stdlib_topics_split_is_fixed_and_balanced(monkeypatch, tmp_path):
    monkeypatch.setenv("PYLLM_CACHE", str(tmp_path))
    train, val, labels = D.stdlib_topics(num_labels=4, max_per_label=30, min_per_label=5, max_files=80)
    assert 2 <= len(labels) <= 4 and labels == sorted(labels)
    assert {r["label"] for r in train} == set(labels) and {r["label"] for r in val} <= set(labels)
    counts = [sum(r["label"] == l for r in train + val) for l in labels]
    assert max(counts) <= 30
    again = D.stdlib_topics(num_labels=4, max_per_label=30, min_per_label=5, max_files=80)
    assert again == (train, val, labels)
