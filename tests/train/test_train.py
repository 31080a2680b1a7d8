"""Training: one tiny run per objective and task, resume equivalence, NaN stop, Ctrl-C, no-overwrite."""

import functools
import json

import pytest
import torch

from pyllm import data as D
from pyllm.train import NonFiniteLossError, Trainer, TrainConfig, finetune, pretrain
from pyllm.train.checkpoint import load_checkpoint
from pyllm.train.optim import lr_factor, param_groups
from pyllm.train.report import read_metrics

from .conftest import QUIET, TINY_MODEL


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def falling(values, k=3):
    """The mean of the last k losses is clearly below the mean of the first k."""
    return sum(values[-k:]) / k < sum(values[:k]) / k - 0.05


# -- optimizer and schedule ---------------------------------------------------------------

def test_weight_decay_groups_skip_norms_and_biases():
    import pyllm.models as M

    m = M.GPTForCausalLM(M.TransformerConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                             max_position_embeddings=16, type_vocab_size=0))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n_unique = len({id(p) for p in m.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied embeddings counted once


def test_lr_schedule_warmup_then_decay():
    f = lambda s, sched: lr_factor(s, total=100, warmup=10, schedule=sched, min_ratio=0.1)  # noqa: E731
    assert f(0, "cosine") < f(5, "cosine") < f(9, "cosine") <= 1.0
    assert f(10, "cosine") == pytest.approx(1.0) and f(100, "cosine") == pytest.approx(0.1)
    assert f(55, "linear") == pytest.approx(0.55) and f(70, "constant") == 1.0


# -- one tiny run per objective and task ----------------------------------------------------

def test_pretrain_clm_on_embedded_corpus(tmp_path):
    r = pretrain(output_dir=str(tmp_path / "gpt"), max_files=25, max_steps=12, batch_size=8, log_every=1,
                 learning_rate=3e-3, warmup_steps=2, sample_tokens=5, eval_every=6,
                 **{**QUIET, "plot": True}, **TINY_MODEL)
    out = r.output_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pyllm_task.json", "checkpoint.safetensors",
                 "metrics.jsonl", "loss_curve.png", "pyllm_run.json"):
        assert (out / name).is_file(), name
    assert falling(losses(out))
    assert r.metrics["steps"] == 12 and r.metrics["peak_memory_mb"] > 0 and r.metrics["tokens"] == 12 * 8 * 32
    assert r.metrics["eval_perplexity"] > 1 and isinstance(r.metrics["sample"], str)
    assert any("eval_loss" in rec for rec in r.history)


def test_pretrain_clm_packed_documents(tmp_path, corpus_file):
    """--pack: whole documents end to end, cu_seqlens, no padding; the loss falls and --pack is clm only."""
    r = pretrain(train_file=str(corpus_file), output_dir=str(tmp_path / "packed"), max_steps=12, batch_size=8,
                 log_every=1, learning_rate=3e-3, warmup_steps=2, pack=True, sample_prompt=None, **QUIET,
                 **TINY_MODEL)
    assert falling(losses(r.output_dir)) and r.metrics["steps"] == 12
    with pytest.raises(ValueError, match="pack takes objective 'clm'"):
        pretrain(objective="mlm", pack=True, output_dir=str(tmp_path / "no"), **QUIET)


def test_pretrain_mlm(tmp_path, corpus_file):
    r = pretrain(objective="mlm", train_file=str(corpus_file), output_dir=str(tmp_path / "bert"), max_steps=12,
                 batch_size=8, log_every=1, learning_rate=3e-3, warmup_steps=2, **QUIET, **TINY_MODEL)
    assert falling(losses(r.output_dir))
    assert json.loads((r.output_dir / "config.json").read_text())["model_type"] == "bert"


def test_finetune_sequence_classification(tmp_path, tiny_bert, cls_files):
    train, dev = cls_files
    r = finetune(model=str(tiny_bert), train_file=str(train), validation_file=str(dev),
                 output_dir=str(tmp_path / "cls"), max_steps=60, batch_size=8, log_every=1, learning_rate=3e-3,
                 warmup_steps=0, max_length=24, **QUIET)
    assert falling(losses(r.output_dir))
    assert {"eval_accuracy", "eval_macro_f1", "majority_class_accuracy"} <= set(r.metrics)
    assert r.metrics["eval_accuracy"] > r.metrics["majority_class_accuracy"]
    task = json.loads((r.output_dir / "pyllm_task.json").read_text())
    assert task["labels"] == ["neg", "pos"]


def test_finetune_label_outside_set_is_an_error(tmp_path, tiny_bert, cls_files):
    train, _ = cls_files
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"text": "x", "label": "pos"}\n{"text": "y", "label": "neutral"}\n')
    with pytest.raises(D.DataError, match=r"dev.jsonl:2: label 'neutral' is not in the label set \[neg, pos\]"):
        finetune(model=str(tiny_bert), train_file=str(train), validation_file=str(bad),
                 output_dir=str(tmp_path / "x"), max_steps=1, **QUIET)


def test_finetune_token_classification(tmp_path, tiny_bert, conll_file):
    r = finetune(task="token-classification", model=str(tiny_bert), train_file=str(conll_file),
                 output_dir=str(tmp_path / "ner"), max_steps=15, batch_size=8, log_every=1, learning_rate=3e-3,
                 max_length=16, **QUIET)
    assert falling(losses(r.output_dir))
    assert {"eval_f1", "eval_accuracy"} <= set(r.metrics)


def test_finetune_question_answering(tmp_path, tiny_bert, squad_file):
    r = finetune(task="question-answering", model=str(tiny_bert), train_file=str(squad_file),
                 output_dir=str(tmp_path / "qa"), max_steps=15, batch_size=8, log_every=1, learning_rate=3e-3,
                 max_length=32, **QUIET)
    assert falling(losses(r.output_dir))
    assert 0 <= r.metrics["eval_exact_match"] <= 100 and 0 <= r.metrics["eval_f1"] <= 100


# -- the core: resume, accumulation, NaN, Ctrl-C ---------------------------------------------

@functools.lru_cache(maxsize=1)
def _wordpiece():
    # One tokenizer for every run compared here: WordPiece training in `tokenizers` breaks
    # ties in hash order, so two trainings on the same text can differ.
    from .conftest import words_corpus

    return D.train_wordpiece(words_corpus(), 200)


def _tiny_setup(dropout=0.1):
    """A tiny BERT MLM on a WordPiece tokenizer: dropout and MLM masks make resumption non-trivial."""
    import pyllm.models as M
    from .conftest import words_corpus

    tok = _wordpiece()
    feats = D.lm_features(words_corpus(), tok, objective="mlm", block_size=16)
    torch.manual_seed(0)
    model = M.BertForMaskedLM(M.TransformerConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2,
                                                  num_heads=2, max_position_embeddings=16, hidden_dropout=dropout))
    return model, feats, D.MLMCollator(tok)


class InterruptAt:
    """A collator that raises KeyboardInterrupt on its n-th call (simulated Ctrl-C)."""

    def __init__(self, collator, n):
        self.collator, self.n, self.calls = collator, n, 0

    def __call__(self, feats, gen=None):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.collator(feats, gen)


def test_resume_continues_the_same_loss_curve(tmp_path):
    cfg = TrainConfig(max_steps=8, batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-3, log_every=1,
                      warmup_steps=2, **QUIET)
    model, feats, collator = _tiny_setup()
    straight = Trainer(model, feats, collator, cfg, tmp_path / "a").train()
    (tmp_path / "b").mkdir()
    model, feats, collator = _tiny_setup()
    # Ctrl-C during step 4 (the 7th micro-batch): the trainer saves after step 3 and re-raises.
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, feats, InterruptAt(collator, 7), cfg, tmp_path / "b").train()
    assert (tmp_path / "b" / "checkpoint.safetensors").is_file()
    assert len(losses(tmp_path / "b")) == 3
    model, feats, collator = _tiny_setup()
    torch.manual_seed(1234)  # the checkpoint's RNG state must win over whatever came before
    resumed = Trainer(model, feats, collator, cfg.replace(resume=True), tmp_path / "b").train()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert resumed.metrics["steps"] == straight.metrics["steps"] == 8


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    runs = []
    for i, accum in enumerate((1, 4)):
        cfg = TrainConfig(max_steps=4, batch_size=8, gradient_accumulation_steps=accum, learning_rate=2e-3,
                          log_every=1, **QUIET)
        model, feats, _ = _tiny_setup(dropout=0.0)
        # Packed MLM blocks all have 16 tokens, but the masked count differs per micro-batch: compare
        # with plain padding-free labels (every token predicts itself) so the means agree exactly.
        runs.append(Trainer(model, feats, D.PadCollator(0, copy_labels=True), cfg, tmp_path / str(i)).train())
    assert losses(tmp_path / "0") == pytest.approx(losses(tmp_path / "1"), rel=1e-4)


def test_gradient_checkpointing_same_losses(tmp_path):
    out = []
    for i, ckpt in enumerate((False, True)):
        cfg = TrainConfig(max_steps=3, batch_size=4, learning_rate=2e-3, log_every=1, gradient_checkpointing=ckpt,
                          **QUIET)
        model, feats, _ = _tiny_setup(dropout=0.0)
        Trainer(model, feats, D.PadCollator(0, copy_labels=True), cfg, tmp_path / str(i)).train()
        out.append(losses(tmp_path / str(i)))
    assert out[0] == pytest.approx(out[1], rel=1e-5)


def test_bf16_autocast_on_cpu_runs(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=4, log_every=1, precision="bf16", **QUIET)
    model, feats, collator = _tiny_setup()
    r = Trainer(model, feats, collator, cfg, tmp_path).train()
    assert all(v == v for v in losses(tmp_path)) and r.metrics["steps"] == 2


class NaNAfter(torch.nn.Module):
    """Wraps a model; from the n-th forward on, its loss is NaN."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, **batch):
        out = self.model(**batch)
        self.calls += 1
        if self.calls >= self.n:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(max_steps=10, batch_size=4, log_every=1, save_every=2, **QUIET)
    model, feats, collator = _tiny_setup()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 .*last good checkpoint .*step 4"):
        Trainer(NaNAfter(model, 5), feats, collator, cfg, tmp_path).train()
    ck = load_checkpoint(tmp_path)  # safetensors + JSON: no pickle to trust
    assert ck["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "non_finite_loss"]
    assert events and events[0]["step"] == 5


def test_early_stopping(tmp_path):
    cfg = TrainConfig(max_steps=50, batch_size=4, log_every=1, eval_every=1, early_stopping_patience=2,
                      learning_rate=1e-9, **QUIET)
    model, feats, collator = _tiny_setup(dropout=0.0)
    calls = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    r = Trainer(model, feats, collator, cfg, tmp_path, eval_features=feats[:4],
                evaluate=lambda m, f, **kw: {"loss": next(calls)}).train()
    assert r.stopped == "early_stopping" and r.metrics["steps"] == 4 and r.metrics["best_eval_loss"] == 2.0


def test_no_overwrite_without_flag(tmp_path, corpus_file):
    kw = dict(train_file=str(corpus_file), output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4,
              **QUIET, **TINY_MODEL)
    pretrain(**kw)
    with pytest.raises(FileExistsError, match="already holds a 'pretrain' run; pass --overwrite"):
        pretrain(**kw)
    pretrain(**kw, overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="files that pyllm did not write"):
        pretrain(**{**kw, "output_dir": str(other)}, overwrite=True)
    assert (other / "notes.txt").read_text() == "precious"
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        pretrain(**{**kw, "output_dir": str(tmp_path / "nothing")}, resume=True)


def test_finetune_gpt_classifier_and_predict(tmp_path, corpus_file, cls_files):
    from pyllm.train import predict

    gpt = pretrain(train_file=str(corpus_file), output_dir=str(tmp_path / "gpt"), max_steps=2, batch_size=8,
                   sample_prompt=None, **QUIET, **TINY_MODEL)
    train, dev = cls_files
    r = finetune(model=str(gpt.output_dir), train_file=str(train), validation_file=str(dev),
                 output_dir=str(tmp_path / "gptcls"), max_steps=3, batch_size=8, max_length=24, **QUIET)
    assert "eval_accuracy" in r.metrics
    (p,) = predict(r.output_dir, ["the module opens the file"], device="cpu")
    assert p["label"] in ("neg", "pos")


def test_finetune_without_minilm_pretrains_a_base_first(tmp_path, cls_files, monkeypatch):
    from pyllm.train import api

    monkeypatch.setattr(api, "default_base_model", lambda: None)
    monkeypatch.setattr(api, "FALLBACK_PRETRAIN", dict(max_steps=2, batch_size=8, **TINY_MODEL))
    train, dev = cls_files
    with pytest.warns(UserWarning, match="pretraining a small BERT first"):
        r = finetune(train_file=str(train), validation_file=str(dev), output_dir=str(tmp_path / "ft"), max_steps=2,
                     batch_size=8, max_length=24, max_files=20, **QUIET)
    assert (tmp_path / "ft" / "base-model" / "model.safetensors").is_file() and r.metrics["steps"] == 2


def test_time_limit_stop_then_resume_with_saved_options(tmp_path, corpus_file):
    out = tmp_path / "run"
    first = pretrain(train_file=str(corpus_file), output_dir=str(out), max_steps=5, batch_size=4, log_every=1,
                     max_time=1e-6, sample_prompt=None, **QUIET, **TINY_MODEL)
    assert first.stopped == "time_limit" and first.metrics["steps"] == 1
    # Only the folder, resume and the new time limit: model size, data, steps come from the saved run.
    second = pretrain(output_dir=str(out), resume=True, max_time=None)
    assert second.stopped == "completed" and second.metrics["steps"] == 5
    assert len(losses(out)) == 5
