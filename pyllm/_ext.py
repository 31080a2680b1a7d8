"""Loads the compiled extension ``pyllm._C`` once; its op registrations make ``torch.ops.pyllm.*`` exist.

Everything is computed at import into plain module constants, so that the dispatch code that reads them
traces cleanly under ``torch.compile`` (dynamo treats module globals as constants).
"""
from __future__ import annotations

import torch


def _load() -> str | None:
    try:
        from pyllm import _C  # noqa: F401
    except ImportError as e:  # not built, or built against another torch
        return f"{type(e).__name__}: {e}"
    if not hasattr(torch.ops.pyllm, "attention_fwd"):
        return "pyllm._C loaded but registered no ops"
    return None


def _has(op: str, dispatch_key: str) -> bool:
    return (_LOAD_ERROR is None and hasattr(torch.ops.pyllm, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"pyllm::{op}", dispatch_key))


_LOAD_ERROR = _load()
_CPU = _has("attention_fwd", "CPU") and _has("layer_norm_fwd", "CPU")
_CUDA = _has("attention_fwd", "CUDA") and _has("layer_norm_fwd", "CUDA")


# op family -> the C++ op whose kernels serve it (an extension built before an op existed lacks it)
_KERNEL_OPS = {"attention": "attention_fwd", "layer_norm": "layer_norm_fwd", "rms_norm": "layer_norm_fwd",
               "rotary": "rotary", "linear_cross_entropy": "linear_cross_entropy_fwd", "gelu_tanh": "gelu_tanh_fwd",
               "attention_ext": "attention_ext_fwd",  # attention with FlashAttention's features
               "attention_varlen": "attention_varlen_fwd",  # packed sequences in one call
               "linear_decode": "linear_decode"}  # pyllm.nn.Linear's few-row inference GEMV (CPU)
_HAS = {(op, key): _has(name, key) for op, name in _KERNEL_OPS.items() for key in ("CPU", "CUDA")}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``pyllm._C`` registered a ``dispatch_key`` ("CPU" / "CUDA") kernel for op family ``op``."""
    return _HAS[(op, dispatch_key)]


def load_error() -> str | None:
    """None if ``pyllm._C`` loaded (its ops registered), else the reason as text."""
    return _LOAD_ERROR


def has_cpu_kernels() -> bool:
    return _CPU


def has_cuda_kernels() -> bool:
    return _CUDA
