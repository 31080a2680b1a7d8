"""AdamW with weight-decay groups, and warmup followed by cosine or linear decay."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (linear and embedding weights) decay; vectors (biases,
    LayerNorm/RMSNorm weights and biases, the embeddings' norm) do not -- decaying
    a norm's gain towards 0 only fights the normalisation."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over all parameters; transformers' Trainer default too) when every
    trainable parameter is a floating-point tensor on the CPU or on CUDA; the multi-tensor one otherwise."""
    kwargs = {}
    params = [p for p in model.parameters() if p.requires_grad]
    if params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) \
            and len({p.device for p in params}) == 1:
        kwargs["fused"] = True
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        **kwargs,
    )


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based).

    Linear warmup from 1/(warmup+1) up to 1 over ``warmup`` steps, then
    ``cosine`` or ``linear`` decay to ``min_ratio`` at ``total``, or ``constant``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"lr_factor: schedule must be cosine, linear or constant, got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total=total_steps, warmup=warmup, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio),
    )
