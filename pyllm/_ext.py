"""Loads the compiled extension ``pyllm._C`` once; its op registrations make ``torch.ops.pyllm.*`` exist."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None if ``pyllm._C`` loaded (its ops registered), else the reason as text."""
    try:
        from pyllm import _C  # noqa: F401
    except ImportError as e:  # not built, or built against another torch
        return f"{type(e).__name__}: {e}"
    if not hasattr(torch.ops.pyllm, "attention_fwd"):
        return "pyllm._C loaded but registered no ops"
    return None


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.pyllm.<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyllm::{op}", dispatch_key)


def has_cuda_kernels() -> bool:
    return has_kernel("attention_fwd", "CUDA") and has_kernel("layer_norm_fwd", "CUDA")


def has_cpu_kernels() -> bool:
    return has_kernel("attention_fwd", "CPU") and has_kernel("layer_norm_fwd", "CPU")
