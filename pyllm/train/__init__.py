"""Training: one core (:class:`Trainer`) for MLM/CLM pretraining and fine-tuning.

Entry points: :func:`pretrain`, :func:`finetune` (keyword arguments or a config
dataclass; both return a :class:`TrainResult` with ``.metrics`` and
``.output_dir``), and :func:`evaluate`, :func:`predict`, :func:`generate` for a
trained folder; :func:`plan` (a :class:`MemoryPlan`: the peak memory of one training step, by part).
Their options are the fields of the dataclasses in :mod:`pyllm.train.config`.
The ``pyllm`` command's pretrain/finetune/evaluate/predict/generate subcommands are in
:mod:`pyllm.train.cli`. Names load on first use (:mod:`pyllm._lazy`).
"""

from pyllm._lazy import lazy_exports

_EXPORTS = {
    **{name: f"pyllm.train.api:{name}" for name in (
        "pretrain", "finetune", "evaluate", "predict", "generate", "load_run")},
    **{name: f"pyllm.train.config:{name}" for name in (
        "TrainConfig", "PretrainConfig", "FinetuneConfig", "EvaluateConfig", "PredictConfig", "GenerateConfig",
        "ConfigError")},
    **{name: f"pyllm.train.trainer:{name}" for name in ("Trainer", "TrainResult", "NonFiniteLossError")},
    "plan": "pyllm.train.memory_plan:plan", "MemoryPlan": "pyllm.train.memory_plan:MemoryPlan",
    "PlanConfig": "pyllm.train.config:PlanConfig",
}

__all__ = sorted(_EXPORTS)

lazy_exports(__name__, _EXPORTS)
