"""Fine-tuning and using encoder-decoders: ``pyllm finetune --task translation | summarization``.

The pieces :mod:`pyllm.train.api` assembles a seq2seq run from (the same run skeleton as every task:
options checked by :class:`~pyllm.train.config.FinetuneConfig`, the run folder's transaction, the shared
Trainer and its pickle-free checkpoints); this module never imports the api:

* ``defaults(config, kwargs)``: what a seq2seq run needs that the classification defaults do not suit (only
  keys the caller did not give); ``pairs(cfg)``, ``build_model(cfg, tokenizer, train_pairs)``,
  ``features(cfg, tokenizer, examples)``, ``evaluator(cfg, tokenizer, examples)``, ``task_info``, ``samples``.
* ``is_seq2seq_folder``, ``load_run``, ``eval_examples``, ``score``, ``translate`` for a run folder whose
  pyllm_task.json names translation or summarization (or a bart / marian / t5 checkpoint folder).

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

from . import dist
from .config import SEQ2SEQ_TASKS, FinetuneConfig, is_default_run
from .run_folder import TASK_FILE

SEQ2SEQ_MODEL_TYPES = ("bart", "marian", "t5")
# the from-scratch model of a run without --model (about 1.1M parameters with the default vocabulary)
SMALL_BART = dict(d_model=128, encoder_layers=2, decoder_layers=2, num_heads=4, ffn_dim=512)
SMALL_VOCAB = 2000  # its byte-level BPE vocabulary, trained on the pairs
NUMBER_SET = 6000  # pairs drawn from the embedded number set; the last 600 are the validation split
NUMBER_TRAIN = 5400


def requested_task(config, kwargs: dict) -> Optional[str]:
    """The task a finetune call asks for before its options are read (keyword, dict or config object)."""
    if "task" in kwargs:
        return kwargs["task"]
    return config.get("task") if isinstance(config, dict) else getattr(config, "task", None)


def defaults(config, kwargs: dict) -> dict:
    """kwargs plus what a seq2seq run needs that finetune's defaults (made for a pretrained classifier) do not
    give, for keys not given: a from-scratch model (no --model) learns at 5e-4 with cosine decay; the embedded
    set (no --train-file) runs 6 epochs (still under the time cap of a run given no length option). A full
    config object, a config file or a resumed run keeps its own values."""
    if config is not None or kwargs.get("resume"):
        return kwargs
    base = {"batch_size": 32, "max_eval_examples": 300}
    if is_default_run(FinetuneConfig, kwargs):  # the epochs set below keep the default run's time cap
        base["max_time"] = FinetuneConfig.time_cap
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


def model_class(model_type: str):
    """The pyllm class of an encoder-decoder model type (bart / marian / t5)."""
    from pyllm.models import BartForConditionalGeneration, T5ForConditionalGeneration
    return T5ForConditionalGeneration if model_type == "t5" else BartForConditionalGeneration


def pairs(cfg):
    """(train pairs, validation pairs, data name): the pairs files, or the embedded number set."""
    if cfg.train_file is None:  # the config allows this for translation only
        numbers = number_pairs(cfg.language, n=NUMBER_SET, seed=cfg.seed)
        return numbers[:NUMBER_TRAIN], numbers[NUMBER_TRAIN:], f"num2words-en-{cfg.language}"
    train = read_pairs(cfg.train_file, cfg.source_column, cfg.target_column)
    if cfg.validation_file:
        val = read_pairs(cfg.validation_file, cfg.source_column, cfg.target_column)
    else:
        k = max(2, round(1 / 0.1))
        train, val = [x for i, x in enumerate(train) if i % k], train[::k]
    return train, val, cfg.train_file


def build_model(cfg, tokenizer, train_pairs):
    """(model, tokenizer): from --model (a bart / marian / t5 folder; anything else is refused naming the
    types) or a new small BART with a byte-level BPE vocabulary trained on the pairs. ``tokenizer`` (a resumed
    run's) is kept when given."""
    from pyllm.models import BartForConditionalGeneration, Seq2SeqConfig
    if cfg.model:
        mt = _model_type(cfg.model)
        if mt not in SEQ2SEQ_MODEL_TYPES:
            raise ValueError(f"finetune --task {cfg.task}: {cfg.model} holds a {mt!r} model; {cfg.task} needs an "
                             f"encoder-decoder of model type {SEQ2SEQ_MODEL_TYPES}")
        cls = model_class(mt)
        overrides = {"dropout": cfg.dropout} if cfg.dropout is not None else {}
        return cls.from_pretrained(cfg.model, **overrides), tokenizer or D.load_tokenizer(cfg.model)
    if tokenizer is None:
        texts = [p["source"] for p in train_pairs] + [p["target"] for p in train_pairs]
        tokenizer = D.train_bpe(texts, vocab_size=SMALL_VOCAB)
    eos = tokenizer.eos_token_id
    config = Seq2SeqConfig(model_type="bart", vocab_size=tokenizer.vocab_size, **SMALL_BART,
                           max_position_embeddings=max(cfg.max_length, cfg.max_target_length) + 2,
                           dropout=0.1 if cfg.dropout is None else cfg.dropout, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=None, eos_token_id=eos, decoder_start_token_id=eos)
    return BartForConditionalGeneration(config), tokenizer


def features(cfg, tokenizer, examples) -> list[dict]:
    """Token ids of pairs; an over-long pair is an error naming its line, except summarization sources, cut."""
    return seq2seq_features(examples, tokenizer, max_source_length=cfg.max_length,
                            max_target_length=cfg.max_target_length, truncate=cfg.task == "summarization")


def task_info(cfg, model, data_name: str) -> dict:
    """What pyllm_task.json records: what evaluate / predict / generate need to use the run."""
    return {"task": cfg.task, "family": model.config.model_type, "max_length": cfg.max_length,
            "max_target_length": cfg.max_target_length, "num_beams": cfg.num_beams, "data": data_name,
            "source_column": cfg.source_column, "target_column": cfg.target_column, "seed": cfg.seed,
            "base_model": str(cfg.model) if cfg.model else None}


def translate(model, tokenizer, sources: Sequence[str], *, batch_size: int, num_beams: int, max_new_tokens: int,
              device) -> list[str]:
    """Generated target texts for source texts (greedy, or beam search with num_beams > 1)."""
    out = []
    for i in range(0, len(sources), batch_size):
        feats = seq2seq_features([{"source": s, "target": "x"} for s in sources[i:i + batch_size]], tokenizer,
                                 max_source_length=model.config.max_position_embeddings,
                                 max_target_length=max_new_tokens + 1, truncate=True)
        batch = Seq2SeqCollator(tokenizer.pad_token_id)(feats)
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


def evaluator(cfg, tokenizer, examples):
    """(Trainer evaluate function: loss on the features, then generation metrics on the examples;
    (the metric early stopping watches, "max"))."""
    def evaluate(model, feats, *, batch_size, device, autocast):
        model = getattr(model, "module", model)
        collate = Seq2SeqCollator(tokenizer.pad_token_id)
        total, count = 0.0, 0
        for i in range(0, len(feats), batch_size):
            batch = {k: v.to(device) for k, v in collate(feats[i:i + batch_size]).items()}
            with autocast():
                loss = model(**batch).loss
            n = int((batch["labels"] != D.IGNORE_INDEX).sum())
            total, count = total + float(loss) * n, count + n
        hyps = translate(model, tokenizer, [e["source"] for e in examples], batch_size=batch_size,
                         num_beams=cfg.num_beams, max_new_tokens=cfg.max_target_length, device=device)
        return {"loss": total / max(count, 1), **scores(cfg.task, hyps, [e["target"] for e in examples])}
    return evaluate, ("chrf", "max") if cfg.task == "translation" else ("rougeL", "max")


def samples(model, tokenizer, examples, cfg, device) -> list[dict]:
    """A few validation sources with their references and the model's outputs (printed by the CLI)."""
    model.eval()
    with torch.no_grad():
        hyps = translate(model, tokenizer, [x["source"] for x in examples], batch_size=len(examples) or 1,
                         num_beams=cfg.num_beams, max_new_tokens=cfg.max_target_length, device=device)
    return [{"source": x["source"], "reference": x["target"], "output": h} for x, h in zip(examples, hyps)]


# -- using a run folder -----------------------------------------------------------------------


def is_seq2seq_folder(folder) -> bool:
    try:
        return _model_type(folder) in SEQ2SEQ_MODEL_TYPES
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def load_run(folder, device):
    """(model, tokenizer, task info) of a seq2seq run folder or a bart / marian / t5 checkpoint folder."""
    mt = _model_type(folder)
    if mt not in SEQ2SEQ_MODEL_TYPES:
        raise ValueError(f"{folder} holds a {mt!r} model, not an encoder-decoder ({SEQ2SEQ_MODEL_TYPES})")
    cls = model_class(mt)
    task_file = Path(folder) / TASK_FILE
    task = json.loads(task_file.read_text()) if task_file.is_file() else {"task": "translation", "max_length": 512}
    model = cls.from_pretrained(folder).to(dist.resolve_device(device)).eval()
    return model, D.load_tokenizer(folder), task


def eval_examples(folder, task: dict, data_file: Optional[str]) -> list[dict]:
    """The pairs of ``data_file`` (the run's own column names), or the embedded number set's held-out split
    when the run trained on it."""
    if data_file is None:
        name = str(task.get("data", ""))
        if not name.startswith("num2words-en-"):
            raise ValueError(f"evaluate: {folder} was trained on {name or 'unknown data'}; pass the pairs file "
                             f"with --data")
        return number_pairs(name.rsplit("-", 1)[1], n=NUMBER_SET, seed=task.get("seed", 0))[NUMBER_TRAIN:]
    return read_pairs(data_file, task.get("source_column", "source"), task.get("target_column", "target"))


def score(model, tokenizer, task: dict, examples, batch_size: int) -> dict:
    """BLEU/chrF (translation) or ROUGE (summarization) of the model's generations for the examples."""
    with torch.no_grad():
        hyps = translate(model, tokenizer, [e["source"] for e in examples], batch_size=batch_size,
                         num_beams=task.get("num_beams", 1), max_new_tokens=task.get("max_target_length", 64),
                         device=model.device)
    return scores(task["task"], hyps, [e["target"] for e in examples])


__all__ = ["SEQ2SEQ_TASKS", "SEQ2SEQ_MODEL_TYPES", "defaults", "pairs", "build_model", "features", "evaluator",
           "task_info", "samples", "is_seq2seq_folder", "load_run", "eval_examples", "score", "translate", "scores"]
