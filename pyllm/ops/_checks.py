"""Argument checks shared by the ops: errors name the argument, what was expected and what came."""
from __future__ import annotations

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
