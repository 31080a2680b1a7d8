"""Seq2seq fine-tuning: pairs files and their errors, the embedded number set, a tiny translation and
summarization run through the CLI, evaluate / predict / generate on the run folder."""
import json

import pytest
import torch

from pyllm.cli import main
from pyllm.data import DataError
from pyllm.data.pairs import Seq2SeqCollator, number_pairs, read_pairs, seq2seq_features

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
pytest.importorskip("num2words")


def test_read_pairs_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"en": "one", "fr": "un"}\n\n{"en": "two", "fr": "deux"}\n')
    (tmp_path / "a.tsv").write_text("en\tfr\none\tun\ntwo\tdeux\n")
    (tmp_path / "a.csv").write_text('en,fr\n"one, again",un\ntwo,deux\n')
    for name in ("a.jsonl", "a.tsv", "a.csv"):
        pairs = read_pairs(tmp_path / name, "en", "fr")
        assert [p["target"] for p in pairs] == ["un", "deux"]
    assert read_pairs(tmp_path / "a.csv", "en", "fr")[0]["source"] == "one, again"


@pytest.mark.parametrize("text, message", [
    ('{"source": "one"}\n', r"a.jsonl:1: missing target column 'target'"),
    ('{"source": "one", "target": "un"}\n{"source": " ", "target": "deux"}\n', r"a.jsonl:2: empty source"),
    ('{"source": "one", "target": "' + "x" * 50 + '"}\n', r"a.jsonl:1: target \('target'\) has 50 characters, over the limit of 20"),
])
def test_read_pairs_errors_name_file_line_and_problem(tmp_path, text, message):
    (tmp_path / "a.jsonl").write_text(text)
    with pytest.raises(DataError, match=message):
        read_pairs(tmp_path / "a.jsonl", max_chars=20)


def test_features_over_length_name_the_line_and_collator_pads(tmp_path):
    from pyllm.data import train_bpe
    (tmp_path / "a.tsv").write_text("source\ttarget\none two\tun deux\n" + "word " * 30 + "\tmot\n")
    pairs = read_pairs(tmp_path / "a.tsv")
    tok = train_bpe([p["source"] for p in pairs] + [p["target"] for p in pairs], vocab_size=300)
    with pytest.raises(DataError, match=r"a.tsv:3: source is \d+ tokens \(with EOS\), over the limit of 8"):
        seq2seq_features(pairs, tok, max_source_length=8, max_target_length=8)
    feats = seq2seq_features(pairs, tok, max_source_length=8, max_target_length=8, truncate=True)
    batch = Seq2SeqCollator(tok.pad_token_id)(feats)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][:, -1].tolist() == [tok.pad_token_id, tok.eos_token_id]
    assert batch["attention_mask"][0].tolist() == [1] * len(feats[0]["input_ids"]) + [0] * (8 - len(feats[0]["input_ids"]))
    assert (batch["labels"][0, len(feats[0]["labels"]):] == -100).all()


def test_number_pairs_are_num2words():
    pairs = number_pairs("fr", n=50, seed=1)
    assert len(pairs) == len({p["source"] for p in pairs}) == 50
    from num2words import num2words
    k = int(pairs[0]["where"].rsplit(":", 1)[1])
    kind = pairs[0]["where"].split(":")[2]
    assert pairs[0]["target"] == num2words(k, lang="fr", to=kind)
    with pytest.raises(ValueError, match="language must be one of"):
        number_pairs("xx")


def test_translation_run_and_folder_commands(tmp_path, capsys):
    pairs = number_pairs("es", n=80, seed=0)
    with open(tmp_path / "train.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps({"en": p["source"], "es": p["target"]}) + "\n")
    out = tmp_path / "run"
    rc = main(["finetune", "--task", "translation", "--train-file", str(tmp_path / "train.jsonl"),
               "--source-column", "en", "--target-column", "es", "--max-steps", "3", "--batch-size", "8",
               "--max-eval-examples", "6", "--max-target-length", "12", "--num-beams", "2", "--output-dir", str(out),
               "--no-progress", "--no-plot"])
    text = capsys.readouterr().out
    assert rc == 0 and "eval_chrf" in text and "eval_bleu" in text and "reference" in text
    from pyllm.train.api import read_task
    task = read_task(out)
    assert task["task"] == "translation" and task["family"] == "bart" and task["num_beams"] == 2
    assert main(["evaluate", str(out), "--data", str(tmp_path / "train.jsonl"), "--max-examples", "4"]) == 0
    assert "chrf" in capsys.readouterr().out
    assert main(["predict", str(out), "seven", "twelve"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    # the folder is a transformers BART checkpoint
    transformers = pytest.importorskip("transformers")
    hf = transformers.BartForConditionalGeneration.from_pretrained(out)
    assert hf.config.model_type == "bart"


def test_summarization_run_reports_rouge(tmp_path, capsys):
    rows = [{"document": f"the {w} sat on the mat and the {w} was happy all day long", "summary": f"{w} on mat"}
            for w in ("cat", "dog", "bird", "fox", "cow", "hen", "pig", "owl", "ant", "bee", "elk", "yak")]
    with open(tmp_path / "docs.csv", "w") as f:
        f.write("document,summary\n" + "".join(f"{r['document']},{r['summary']}\n" for r in rows))
    rc = main(["finetune", "--task", "summarization", "--train-file", str(tmp_path / "docs.csv"), "--source-column",
               "document", "--target-column", "summary", "--max-steps", "2", "--batch-size", "4",
               "--max-length", "16", "--max-target-length", "8", "--output-dir", str(tmp_path / "run"),
               "--no-progress", "--no-plot"])
    text = capsys.readouterr().out
    assert rc == 0 and "eval_rouge1" in text and "eval_rougeL" in text


def test_seq2seq_task_on_a_decoder_only_model_names_the_types(tmp_path, capsys):
    from pyllm.models import GPTForCausalLM, TransformerConfig
    GPTForCausalLM(TransformerConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2)).save_pretrained(
        tmp_path / "gpt")
    (tmp_path / "p.jsonl").write_text('{"source": "a", "target": "b"}\n' * 4)
    rc = main(["finetune", "--task", "translation", "--model", str(tmp_path / "gpt"), "--train-file",
               str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "'gpt2' model" in err and "('bart', 'marian', 't5')" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    rc = main(["finetune", "--task", "translation", "--train-file", str(tmp_path / "missing.jsonl")])
    assert rc == 2


def test_classification_on_a_seq2seq_folder_names_the_types(tmp_path, capsys):
    from pyllm.models import BartForConditionalGeneration, Seq2SeqConfig
    BartForConditionalGeneration(Seq2SeqConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                               num_heads=2, ffn_dim=32, max_position_embeddings=16)).save_pretrained(
        tmp_path / "bart")
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "x"}\n' * 4)
    rc = main(["finetune", "--model", str(tmp_path / "bart"), "--train-file", str(tmp_path / "t.jsonl"),
               "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    assert rc == 2 and "'bart' model" in capsys.readouterr().err


def test_seq2seq_options_are_checked_config_fields(tmp_path, capsys):
    """The seq2seq options are typed FinetuneConfig fields: bad values stop before anything is written, and
    the embedded number set's languages are pyllm.data.pairs's (config.py imports no torch, so it lists them)."""
    from pyllm.data.pairs import NUMBER_LANGUAGES
    from pyllm.train import config as C
    assert C.NUMBER_LANGUAGES == NUMBER_LANGUAGES
    for flags, message in ((["--num-beams", "0"], "--num-beams must be an integer >= 1, got 0"),
                           (["--max-target-length", "1"], "--max-target-length must be an integer >= 2"),
                           (["--task", "summarization"], "task 'summarization' needs a train_file")):
        assert main(["finetune", "--task", "translation", *flags, "--output-dir", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses a value outside the field's choices
        main(["finetune", "--task", "translation", "--language", "xx", "--output-dir", str(tmp_path / "run")])
    assert "invalid choice: 'xx'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="language must be one of"):
        from pyllm.train import finetune
        finetune(task="translation", language="xx", output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_seq2seq_run_never_writes_over_a_users_folder(tmp_path, capsys):
    """A translation run goes through the run folder's transaction: a folder that is not a pyllm run is
    refused with its files untouched, and a finished run's folder holds the pickle-free checkpoint."""
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"source": f"w{i}", "target": f"m{i}"}) + "\n"
                                              for i in range(12)))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["finetune", "--task", "translation", "--train-file", str(tmp_path / "p.jsonl"), "--max-steps", "1",
            "--batch-size", "4", "--max-target-length", "6", "--no-progress", "--no-plot"]
    assert main([*args, "--output-dir", str(mine)]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    capsys.readouterr()
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 0
    held = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"checkpoint.safetensors", "pyllm_run.json", "pyllm_task.json", "generation_config.json"} <= held
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in held)
