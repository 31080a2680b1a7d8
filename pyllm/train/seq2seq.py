"""Fine-tuning and using encoder-decoders: ``pyllm finetune --task translation | summarization``.

The narrow interface the rest of pyllm.train calls:

* ``SEQ2SEQ_TASKS``; ``defaults(kwargs)`` fills what a seq2seq run needs that the classification defaults
  do not suit (only keys the caller did not give); ``finetune_job(cfg, info, device)`` runs it on the shared
  Trainer (features, collator, evaluator, model are built here).
* ``evaluate_run(folder, ...)``, ``predict_run(folder, texts, ...)`` for a run folder whose task.json names
  translation or summarization.

Data: pairs files (``pyllm.data.pairs``: .jsonl/.tsv/.csv, columns by --source-column/--target-column); with
no --train-file the embedded num2words number set (English -> --language, default French). Model: --model
names a bart / marian / t5 folder (its tokenizer.json is used), else a small BART is trained from scratch with
a byte-level BPE tokenizer trained on the pairs. Metrics: BLEU and chrF by sacrebleu (translation), ROUGE-1/2/L
by rouge-score (summarization), on greedy (or --num-beams) generations of the validation sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from pyllm import data as D
from pyllm.data.pairs import Seq2SeqCollator, number_pairs, read_pairs, seq2seq_features

from .trainer import Trainer

SEQ2SEQ_TASKS = ("translation", "summarization")
SEQ2SEQ_MODEL_TYPES = ("bart", "marian", "t5")
# the from-scratch model of a run without --model (about 1.1M parameters with the default vocabulary)
SMALL_BART = dict(d_model=128, encoder_layers=2, decoder_layers=2, num_heads=4, ffn_dim=512)
SMALL_VOCAB = 2000  # its byte-level BPE vocabulary, trained on the pairs
def defaults(config, kwargs: dict) -> dict:
    """kwargs plus what a seq2seq run needs that finetune's defaults (made for a pretrained classifier) do not
    give, for keys not given: a from-scratch model (no --model) learns at 5e-4 with cosine decay; the embedded
    set (no --train-file) runs 6 epochs. A full config object or a resumed run keeps its own values."""
    if config is not None or kwargs.get("resume"):
        return kwargs
    base = {"batch_size": 32, "max_eval_examples": 300}
    if not kwargs.get("model"):
        base.update(learning_rate=5e-4, warmup_ratio=0.05, schedule="cosine")
    if not kwargs.get("train_file"):
        base["epochs"] = 6.0
    return {**base, **kwargs}


def _model_type(folder) -> str:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a model folder")
    return json.loads(cfg.read_text()).get("model_type")


def _pairs(cfg):
    if cfg.train_file is None:
        if cfg.task != "translation":
            raise ValueError("finetune: --task summarization needs --train-file (the embedded set is translation)")
        pairs = number_pairs(cfg.language, n=6000, seed=cfg.seed)
        return pairs[:5400], pairs[5400:], f"num2words-en-{cfg.language}"
    train = read_pairs(cfg.train_file, cfg.source_column, cfg.target_column)
    if cfg.validation_file:
        val = read_pairs(cfg.validation_file, cfg.source_column, cfg.target_column)
    else:
        k = max(2, round(1 / 0.1))
        train, val = [x for i, x in enumerate(train) if i % k], train[::k]
    return train, val, cfg.train_file


def _build_model(cfg, tokenizer, train_pairs):
    """(model, tokenizer): from --model (bart / marian / t5 folder) or a new small BART."""
    from pyllm.models import BartForConditionalGeneration, Seq2SeqConfig, T5ForConditionalGeneration
    if cfg.model:
        cls = T5ForConditionalGeneration if _model_type(cfg.model) == "t5" else BartForConditionalGeneration
        overrides = {"dropout": cfg.dropout} if cfg.dropout is not None else {}
        return cls.from_pretrained(cfg.model, **overrides), tokenizer or D.Tokenizer.from_folder(cfg.model)
    if tokenizer is None:
        texts = [p["source"] for p in train_pairs] + [p["target"] for p in train_pairs]
        tokenizer = D.train_bpe(texts, vocab_size=SMALL_VOCAB)
    eos = tokenizer.eos_id
    config = Seq2SeqConfig(model_type="bart", vocab_size=tokenizer.vocab_size, **SMALL_BART,
                           max_position_embeddings=max(cfg.max_length, cfg.max_target_length) + 2,
                           dropout=0.1 if cfg.dropout is None else cfg.dropout, pad_token_id=tokenizer.pad_id,
                           bos_token_id=None, eos_token_id=eos, decoder_start_token_id=eos)
    return BartForConditionalGeneration(config), tokenizer


def _texts(model, tokenizer, sources: Sequence[str], *, batch_size: int, num_beams: int, max_new_tokens: int,
           device) -> list[str]:
    """Generated target texts for source texts (greedy, or beam search with num_beams > 1)."""
    out = []
    for i in range(0, len(sources), batch_size):
        feats = seq2seq_features([{"source": s, "target": "x"} for s in sources[i:i + batch_size]], tokenizer,
                                 max_source_length=model.config.max_position_embeddings,
                                 max_target_length=max_new_tokens + 1, truncate=True)
        batch = Seq2SeqCollator(tokenizer.pad_id)(feats)
        ids = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, num_beams=num_beams)
        out += [tokenizer.decode(row[1:].tolist()).strip() for row in ids.cpu()]
    return out


def scores(task: str, hypotheses: list[str], references: list[str]) -> dict:
    """translation: sacreBLEU BLEU and chrF; summarization: ROUGE-1/2/L F1 (rouge-score, stemmed), in 0-100."""
    if task == "translation":
        import sacrebleu
        return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
                "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for h, r in zip(hypotheses, references):
        for k, s in scorer.score(r, h).items():
            totals[k] += s.fmeasure
    return {k: 100 * v / max(len(hypotheses), 1) for k, v in totals.items()}


def _evaluator(task: str, tokenizer, examples, *, num_beams: int, max_new_tokens: int):
    """Trainer evaluate function: loss on the features, then generation metrics on the examples."""
    def evaluate(model, features, *, batch_size, device, autocast):
        model = getattr(model, "module", model)
        collate = Seq2SeqCollator(tokenizer.pad_id)
        total, count = 0.0, 0
        for i in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(features[i:i + batch_size]).items()}
            with autocast():
                loss = model(**batch).loss
            n = int((batch["labels"] != D.IGNORE_INDEX).sum())
            total, count = total + float(loss) * n, count + n
        hyps = _texts(model, tokenizer, [e["source"] for e in examples], batch_size=batch_size, num_beams=num_beams,
                      max_new_tokens=max_new_tokens, device=device)
        return {"loss": total / max(count, 1), **scores(task, hyps, [e["target"] for e in examples])}
    return evaluate


def _check(cfg):
    from pyllm.data.pairs import NUMBER_LANGUAGES
    if cfg.language not in NUMBER_LANGUAGES:
        raise ValueError(f"finetune: --language must be one of {NUMBER_LANGUAGES}, got {cfg.language!r}")
    if cfg.num_beams < 1:
        raise ValueError(f"finetune: --num-beams must be >= 1, got {cfg.num_beams}")
    if cfg.max_target_length < 2:
        raise ValueError(f"finetune: --max-target-length must be >= 2, got {cfg.max_target_length}")
    if cfg.model:
        mt = _model_type(cfg.model)
        if mt not in SEQ2SEQ_MODEL_TYPES:
            raise ValueError(f"finetune --task {cfg.task}: {cfg.model} holds a {mt!r} model; {cfg.task} needs an "
                             f"encoder-decoder of model type {SEQ2SEQ_MODEL_TYPES}")


def finetune_job(cfg, info, device):
    """The finetune job for translation / summarization (same run folder, Trainer and checkpoints)."""
    from .api import _saver, _start_run, _subset

    _check(cfg)
    train_x, val_x, data_name = _pairs(cfg)  # data errors before the run folder is touched
    out = _start_run(cfg, "finetune", info)
    torch.manual_seed(cfg.seed)
    train_x = _subset(train_x, cfg.max_train_examples, cfg.seed)
    val_x = _subset(val_x, cfg.max_eval_examples, cfg.seed + 1)
    tokenizer = D.Tokenizer.from_folder(out) if cfg.resume else None
    model, tokenizer = _build_model(cfg, tokenizer, train_x)
    summarize = cfg.task == "summarization"
    feats = [seq2seq_features(x, tokenizer, max_source_length=cfg.max_length, max_target_length=cfg.max_target_length,
                              truncate=summarize) for x in (train_x, val_x)]
    task_info = {"task": cfg.task, "family": model.config.model_type, "max_length": cfg.max_length,
                 "max_target_length": cfg.max_target_length, "num_beams": cfg.num_beams, "data": data_name,
                 "source_column": cfg.source_column, "target_column": cfg.target_column, "seed": cfg.seed,
                 "base_model": str(cfg.model) if cfg.model else None}
    evaluate = _evaluator(cfg.task, tokenizer, val_x, num_beams=cfg.num_beams, max_new_tokens=cfg.max_target_length)
    monitor = ("chrf", "max") if cfg.task == "translation" else ("rougeL", "max")
    trainer = Trainer(model, feats[0], Seq2SeqCollator(tokenizer.pad_id), cfg, out, eval_features=feats[1],
                      evaluate=evaluate, monitor=monitor, save_model=_saver(tokenizer, task_info),
                      description=f"finetune {cfg.task}")
    result = trainer.train()
    result.metrics.update(train_examples=len(feats[0]), eval_examples=len(feats[1]), parameters=model.num_parameters())
    model.eval()
    with torch.no_grad():
        hyps = _texts(model, tokenizer, [x["source"] for x in val_x[:5]], batch_size=5, num_beams=cfg.num_beams,
                      max_new_tokens=cfg.max_target_length, device=model.device)
    result.metrics["samples"] = [{"source": x["source"], "reference": x["target"], "output": h}
                                 for x, h in zip(val_x[:5], hyps)]
    return result


def load_run(folder, device):
    """(model, tokenizer, task info) of a seq2seq run folder or a bart / marian / t5 checkpoint folder."""
    from pyllm.models import BartForConditionalGeneration, T5ForConditionalGeneration
    mt = _model_type(folder)
    if mt not in SEQ2SEQ_MODEL_TYPES:
        raise ValueError(f"{folder} holds a {mt!r} model, not an encoder-decoder ({SEQ2SEQ_MODEL_TYPES})")
    cls = T5ForConditionalGeneration if mt == "t5" else BartForConditionalGeneration
    from .api import TASK_FILE
    task_file = Path(folder) / TASK_FILE
    task = json.loads(task_file.read_text()) if task_file.is_file() else {"task": "translation", "max_length": 512}
    from .dist import resolve_device
    model = cls.from_pretrained(folder).to(resolve_device(device)).eval()
    return model, D.Tokenizer.from_folder(folder), task


def is_seq2seq_folder(folder) -> bool:
    try:
        return _model_type(folder) in SEQ2SEQ_MODEL_TYPES
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def evaluate_run(folder, data_file: Optional[str] = None, *, batch_size: int = 32, device="auto",
                 max_examples: Optional[int] = None) -> dict:
    """BLEU/chrF or ROUGE of a run folder on a pairs file (the run's own column names), or on the embedded
    number set's held-out split when the run trained on it."""
    model, tokenizer, task = load_run(folder, device)
    if data_file is None:
        name = str(task.get("data", ""))
        if not name.startswith("num2words-en-"):
            raise ValueError(f"evaluate: {folder} was trained on {name or 'unknown data'}; pass the pairs file "
                             f"with --data")
        examples = number_pairs(name.rsplit("-", 1)[1], n=6000, seed=task.get("seed", 0))[5400:]
    else:
        examples = read_pairs(data_file, task.get("source_column", "source"), task.get("target_column", "target"))
    examples = examples[:max_examples] if max_examples else examples
    with torch.no_grad():
        hyps = _texts(model, tokenizer, [e["source"] for e in examples], batch_size=batch_size,
                      num_beams=task.get("num_beams", 1), max_new_tokens=task.get("max_target_length", 64),
                      device=model.device)
    return {**scores(task["task"], hyps, [e["target"] for e in examples]), "examples": len(examples)}


def predict_run(folder, texts: Sequence[str], *, batch_size: int = 32, device="auto",
                num_beams: Optional[int] = None, max_new_tokens: Optional[int] = None) -> list[str]:
    """Translations / summaries of `texts` by a run folder (its num_beams and target length unless given)."""
    model, tokenizer, task = load_run(folder, device)
    with torch.no_grad():
        return _texts(model, tokenizer, list(texts), batch_size=batch_size,
                      num_beams=num_beams or task.get("num_beams", 1),
                      max_new_tokens=max_new_tokens or task.get("max_target_length", 64), device=model.device)


__all__ = ["SEQ2SEQ_TASKS", "defaults", "finetune_job", "evaluate_run", "predict_run", "is_seq2seq_folder", "scores"]
