"""Argument checks shared by the ops: errors name the argument, what was expected and what came."""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(fn: str, name: str, t, *, ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must have dtype float32, float16, bfloat16 or float64, got {_dt(t.dtype)}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")


def same_device(fn: str, ref_name: str, ref: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def same_dtype(fn: str, ref_name: str, ref: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{fn}: {name} has dtype {_dt(t.dtype)} but {ref_name} has {_dt(ref.dtype)}")


def optional_tensor(fn: str, name: str, t, expected: str) -> None:
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be {expected} or None, got {type(t).__name__}")


def scale(fn: str, name: str, value) -> None:
    """A softmax scale: None (1/sqrt(head_dim)) or a finite real number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a finite float or None, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite float or None, got {value!r}")
