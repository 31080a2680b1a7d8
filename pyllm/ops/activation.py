"""GELU, a drop-in for ``torch.nn.functional.gelu``, with a fused kernel for the tanh approximation.

``approximate="tanh"`` (GPT-2's ``gelu_new``) is served by the kernel ops ``pyllm::gelu_tanh_fwd`` /
``pyllm::gelu_tanh_bwd`` (C++ for CPU and CUDA, ``pyllm::triton_gelu_tanh_*``; contract in csrc/pyllm.cpp),
which compute ``x * sigmoid(2u)`` -- one exp per element -- where PyTorch's CPU kernel evaluates a tanh
(2048 x 1024 fp32, one thread's CPU time on a 2-core Xeon Sapphire Rapids, 2026-11-30: about 3.6x faster
forward, 2.7x backward; `pyllm bench --op gelu` gives the 2-thread ratios). The exact form
(``approximate="none"``) is PyTorch's own ``F.gelu`` on every backend: its erf kernel is already fast.
Validation happens here, once; :mod:`pyllm.backends` then picks who serves the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyllm import backends, reference
from pyllm.ops import _checks


def _check(x, approximate) -> None:
    _checks.tensor("gelu", "input", x)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def _call(x: Tensor, approximate: str = "tanh") -> dict:
    unsupported = []
    if approximate == "none":
        unsupported.append("approximate='none' is PyTorch's own F.gelu (its erf kernel is already fast)")
    if x.numel() == 0:
        unsupported.append("empty input (served by the reference)")
    return {"device": x.device, "dtype": x.dtype, "unsupported": unsupported}


def _kernel(name: str):
    if name == "triton":
        return torch.ops.pyllm.triton_gelu_tanh_fwd
    return torch.ops.pyllm.gelu_tanh_fwd  # the C++ op: CPU or CUDA kernel by the tensor's device


def gelu(x: Tensor, approximate: str = "none", *, backend: str | None = None) -> Tensor:
    """GELU, elementwise: ``x * Phi(x)`` (``approximate="none"``) or its tanh approximation
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` (``approximate="tanh"``, GPT-2's ``gelu_new``).

    Args:
        x: any shape; fp32 / fp16 / bf16 (fp64 on the CPU and the reference). Any strides (a non-contiguous
            input is copied once).
        approximate: "none" (default) or "tanh", as in ``F.gelu``. "none" is always PyTorch's own kernel.
        backend: for "tanh": "auto" (default), "reference", "cpu", "cuda" or "triton".

    Returns:
        x's shape and dtype, contiguous; math in fp32 (fp64 for fp64). Differentiable (the backward is
        fused too).
    """
    _check(x, approximate)
    if approximate == "none":
        return F.gelu(x)
    name = backends.select("gelu_tanh", _call(x), backend)
    if name == "reference":
        return reference.gelu_tanh(x)
    return _kernel(name)(x if x.is_contiguous() else x.contiguous())


def _describe(x, approximate="none", **_):
    _check(x, approximate)
    return "gelu_tanh", _call(x, approximate)


backends.register_op("gelu", _describe)
