"""Training: one core (:class:`Trainer`) for MLM/CLM pretraining and fine-tuning.

Entry points: :func:`pretrain`, :func:`finetune` (keyword arguments or a config
dataclass; both return a :class:`TrainResult` with ``.metrics`` and
``.output_dir``), and :func:`evaluate`, :func:`predict`, :func:`generate` for a
trained folder. The ``pyllm`` command's pretrain/finetune/evaluate/predict/generate
subcommands are in :mod:`pyllm.train.cli`.

Names are imported on first use, so ``import pyllm.train.cli`` (what ``pyllm --help``
does) stays free of torch and tokenizers.
"""

import importlib

_EXPORTS = {
    "pretrain": "api", "finetune": "api", "evaluate": "api", "predict": "api", "generate": "api",
    "load_run": "api",
    "TrainConfig": "config", "PretrainConfig": "config", "FinetuneConfig": "config",
    "Trainer": "trainer", "TrainResult": "trainer", "NonFiniteLossError": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyllm.train' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
