"""Shared fixtures for the training tests: tiny models, tiny data, one thread.

Everything here is sized so the whole folder runs in well under three minutes on
one core: models of 2 layers and width 32, vocabularies of a few hundred tokens,
runs of a handful of steps.
"""

import json
import os

import pytest
import torch

TINY_MODEL = dict(num_layers=2, hidden_size=32, num_heads=2, vocab_size=400, block_size=32)
QUIET = dict(progress=False, plot=False, device="cpu", distributed="none")


@pytest.fixture(autouse=True)
def one_thread():
    # Many small matmuls: on a shared machine one thread is faster and far steadier than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Build the embedded corpus into a private cache, not the user's ~/.cache."""
    old = os.environ.get("PYLLM_CACHE")
    os.environ["PYLLM_CACHE"] = str(tmp_path_factory.mktemp("pyllm-cache"))
    yield
    if old is None:
        os.environ.pop("PYLLM_CACHE", None)
    else:
        os.environ["PYLLM_CACHE"] = old


def words_corpus(n_docs=120, seed=0):
    """Small, learnable English-like text: repeated templates with a few slots."""
    g = torch.Generator().manual_seed(seed)
    subjects = ["the parser", "this function", "the socket", "a queue", "the server", "the module"]
    verbs = ["returns", "reads", "writes", "closes", "opens", "checks"]
    objects = ["the value", "a string", "the file", "a list of items", "the header", "the buffer"]
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(3):
            s, v, o = (int(torch.randint(len(x), (1,), generator=g)) for x in (subjects, verbs, objects))
            sents.append(f"{subjects[s].capitalize()} {verbs[v]} {objects[o]}.")
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in words_corpus()))
    return path


# Every word the test data uses, so the tiny BERT's vocabulary is fixed (WordPiece *training*
# in `tokenizers` breaks ties in hash order and could change from run to run).
VOCAB_WORDS = sorted(set(" ".join(words_corpus()).lower().replace(".", " ").split()) | {
    "and", "value", "alice", "bob", "carol", "dave", "what", "color", "is", "its", "first", "later", "closed",
    "opened", "red", "blue", "green", "black", "it", "of", "."})


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, corpus_file):
    """A 2-layer BERT briefly pretrained with MLM: the base model of the fine-tuning tests."""
    from pyllm.train import pretrain

    tok = tmp_path_factory.mktemp("tok")
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz?,"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), *VOCAB_WORDS]
    (tok / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    out = tmp_path_factory.mktemp("runs") / "tiny-bert"
    torch.set_num_threads(1)
    r = pretrain(objective="mlm", train_file=str(corpus_file), tokenizer=str(tok), output_dir=str(out), max_steps=4,
                 batch_size=8, log_every=1, **TINY_MODEL, **QUIET)
    return r.output_dir


@pytest.fixture(scope="session")
def cls_files(tmp_path_factory):
    """A two-class sentiment-like set that a tiny model can learn in a few steps."""
    d = tmp_path_factory.mktemp("cls")
    g = torch.Generator().manual_seed(1)
    # Words the tiny tokenizer knows as single tokens (they come from words_corpus).
    good, bad = ["opens", "reads"], ["closes", "writes"]
    rows = []
    for i in range(96):
        label = "pos" if i % 2 == 0 else "neg"
        words = good if label == "pos" else bad
        w = [words[int(torch.randint(2, (1,), generator=g))] for _ in range(2)]
        rows.append({"text": f"the module {w[0]} the file and {w[1]} the value", "label": label})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:80]))
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[80:]))
    return d / "train.jsonl", d / "dev.jsonl"


@pytest.fixture(scope="session")
def conll_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("conll")
    names = ["Alice", "Bob", "Carol", "Dave"]
    lines = ["-DOCSTART- O", ""]
    for i in range(48):
        n = names[i % 4]
        lines += [f"{n} B-PER", "opens O", "the O", "file O", ""]
    path = d / "train.conll"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def squad_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("squad")
    colors = ["red", "blue", "green", "black"]
    paras = []
    for i in range(40):
        c = colors[i % 4]
        ctx = f"The file is opened first. Its color is {c} and it is closed later."
        paras.append({"context": ctx, "qas": [{"id": f"q{i}", "question": "What color is the file?",
                                               "answers": [{"text": c, "answer_start": ctx.index(c)}]}]})
    path = d / "train.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paras}]}))
    return path
