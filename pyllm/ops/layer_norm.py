"""LayerNorm and RMSNorm ops: validation, dispatch to a backend, autograd (the C++ op's in C++, csrc/autograd.cpp;
the Triton op's through torch.library).

Each backend gets a 2-D view ``x2`` (M, N) (M = product of the leading dims, N = product of
``normalized_shape``) whose last dim is contiguous; the result is reshaped back.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyllm import backends, reference
from pyllm.ops import _autograd, _checks, _fast

_Shape = int | Sequence[int] | torch.Size


def _normalized(fn: str, x: Tensor, normalized_shape: _Shape) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not all(isinstance(s, int) and s > 0 for s in shape) or len(shape) == 0:
        raise ValueError(f"{fn}: normalized_shape must be positive ints, got {normalized_shape!r}")
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(
            f"{fn}: normalized_shape {list(shape)} must match the trailing dims of input, "
            f"got input of shape {list(x.shape)}"
        )
    return shape


def _check(fn: str, x, normalized_shape, weight, bias, residual, eps) -> tuple[int, ...]:
    _checks.tensor(fn, "input", x)
    shape = _normalized(fn, x, normalized_shape)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _checks.tensor(fn, name, p)
        if tuple(p.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {list(shape)}, got {list(p.shape)}")
        if p.dtype == torch.float64 and x.dtype != torch.float64:
            raise TypeError(f"{fn}: {name} is float64 but input is {_checks._dt(x.dtype)}; cast one of them")
    if residual is not None:
        _checks.tensor(fn, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual must have the input's shape {list(x.shape)}, got {list(residual.shape)}")
    _checks.same_device(fn, "input", x, weight=weight, bias=bias, residual=residual)
    if eps is not None and (not isinstance(eps, (int, float)) or not eps >= 0 or math.isinf(eps)):
        raise ValueError(f"{fn}: eps must be a finite float >= 0, got {eps!r}")
    return shape


def _harmonize(x, weight, bias, residual):
    """Mixed precision (autocast): h = x + residual follows torch's type promotion, so a bf16 branch output
    added to an fp32 residual stream is normalized in fp32; half-precision parameters that differ from the
    input's dtype are upcast to fp32 (lossless), which every kernel accepts."""
    if residual is not None and residual.dtype != x.dtype:
        common = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(common), residual.to(common)
    weight, bias = (p if p is None or p.dtype in (x.dtype, torch.float32) else p.float() for p in (weight, bias))
    return x, weight, bias, residual


def _call(x: Tensor, n: int, weight: Tensor | None) -> dict:
    call = {"device": x.device, "dtype": x.dtype, "hidden": n,
            "weight_dtype": None if weight is None else weight.dtype}
    if x.numel() == 0:
        call["unsupported"] = ["empty input (served by the reference)"]
    return call


def _describe(op: str):
    def describe(x, normalized_shape, weight=None, *rest, residual=None, **_):
        bias = rest[0] if op == "layer_norm" and rest else None
        shape = _check(op, x, normalized_shape, weight, bias, residual, None)
        return op, _call(x, math.prod(shape), weight)

    return describe


def _kernel_fwd(name: str):
    if name == "triton":
        return torch.ops.pyllm.triton_layer_norm_fwd
    return torch.ops.pyllm.layer_norm_fwd  # the C++ op; the tensors' device picks the CPU or CUDA kernel


def _reference(op, x, shape, weight, bias, eps, residual):
    """The reference backend: PyTorch's own norm where it takes these dtypes, else the plain math."""
    h = x if residual is None else x + residual
    if all(p is None or p.dtype == x.dtype for p in (weight, bias)):
        if op == "rms_norm":
            y = F.rms_norm(h, shape, weight, eps)
        else:
            y = F.layer_norm(h, shape, weight, bias, eps)
    elif op == "rms_norm":
        y = reference.rms_norm(h, shape, weight, eps)
    else:
        y = reference.layer_norm(h, shape, weight, bias, eps)
    return y if residual is None else (y, h)


def _norm(op, x, shape, weight, bias, eps, residual, backend, key=None):
    name = backends.select(op, _call(x, math.prod(shape), weight), backend)
    if name == "reference":
        return _reference(op, x, shape, weight, bias, eps, residual)
    if key is not None:  # validated, unconverted, served by a kernel: later calls like it skip to _kernel
        if len(_validated) > 1024:
            _validated.clear()
        _validated[key] = (name, shape, eps)
    return _kernel(op, name, x, shape, weight, bias, eps, residual)


# Small calls (issue 15): the common call on CPU tensors is recognized in C++ (pyllm.ops._fast); others
# (CUDA tensors, the triton backend, ...) have this: a call's checks, dtype harmonization and backend choice
# depend only on its arguments' metadata, so a call whose metadata was validated before (and needed no
# conversion) goes straight to the kernel. The key holds no tensor (nothing kept alive) and the backend in
# force (per call, use(), the env).
_validated: dict = {}
_FAST = _fast.load("layer_norm_fast", ("layer_norm", "rms_norm"))
_CPU = _fast.CPU_CHOICES


def _fast_key(op, x, normalized_shape, weight, bias, eps, residual, backend):
    if (residual is not None or not isinstance(x, Tensor) or not (eps is None or type(eps) is float)
            or type(normalized_shape) not in (int, tuple, torch.Size) or torch.compiler.is_compiling()):
        return None
    meta = []
    for p in (weight, bias):
        if p is not None:
            if not isinstance(p, Tensor) or p.dtype not in (x.dtype, torch.float32):
                return None
            p = (p.shape, p.dtype, p.device)
        meta.append(p)
    return (op, x.shape, x.dtype, x.device, normalized_shape, *meta, eps, backends.requested(backend),
            os.environ.get("TRITON_INTERPRET"))


def _kernel(op, name, x, shape, weight, bias, eps, residual):
    rms = op == "rms_norm"
    n = math.prod(shape)
    flat = x.dim() == 2 and len(shape) == 1  # already (M, N): no reshapes (small calls pay for each)
    x2 = x if flat else x.reshape(-1, n)
    r2 = residual if residual is None or flat else residual.reshape(-1, n)
    if x2.numel() and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if r2 is not None and r2.numel() and r2.stride(1) != 1:
        r2 = r2.contiguous()
    w = weight if weight is None or len(shape) == 1 else weight.reshape(n)
    b = bias if bias is None or len(shape) == 1 else bias.reshape(n)
    y, h, _, _ = _autograd.call(_kernel_fwd(name), x2, w, b, r2, float(eps), rms)
    if not flat:
        y = y.view(x.shape)
    return y if residual is None else (y, h if flat else h.view(x.shape))


def layer_norm(
    x: Tensor,
    normalized_shape: _Shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    backend: str | None = None,
):
    """Fused LayerNorm, a drop-in for ``torch.nn.functional.layer_norm``.

    x: (..., *normalized_shape); weight, bias: normalized_shape. Statistics in fp32. Mixed precision follows
    torch: ``x + residual`` is type-promoted (a bf16 input with an fp32 residual is normalized in fp32).
    With ``residual`` (shape of x) computes ``h = x + residual`` in the same pass and returns
    ``(layer_norm(h), h)`` -- the pre-norm Transformer block's add & norm. ``backend`` picks a backend
    by name (see :mod:`pyllm.backends`); the default follows ``backends.use`` / ``PYLLM_BACKEND`` / auto.
    """
    if _FAST is not None and backend in _CPU and backends._current in _CPU and not torch.compiler.is_compiling():
        out = _FAST(x, normalized_shape, weight, bias, residual, eps, False)  # the common call, in C++
        if out is not None:
            return out
    key = _fast_key("layer_norm", x, normalized_shape, weight, bias, eps, residual, backend)
    hit = _validated.get(key) if key is not None else None
    if hit is not None:
        return _kernel("layer_norm", hit[0], x, hit[1], weight, bias, hit[2], None)
    shape = _check("layer_norm", x, normalized_shape, weight, bias, residual, eps)
    x, weight, bias, residual = _harmonize(x, weight, bias, residual)
    return _norm("layer_norm", x, shape, weight, bias, eps, residual, backend, key)


def rms_norm(
    x: Tensor,
    normalized_shape: _Shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    residual: Tensor | None = None,
    backend: str | None = None,
):
    """Fused RMSNorm, a drop-in for ``torch.nn.functional.rms_norm``: ``x / sqrt(mean(x^2) + eps) * weight``.

    ``eps=None`` means ``torch.finfo(x.dtype).eps`` (torch's default). ``residual`` as in :func:`layer_norm`.
    """
    if _FAST is not None and backend in _CPU and backends._current in _CPU and not torch.compiler.is_compiling():
        out = _FAST(x, normalized_shape, weight, None, residual, eps, True)
        if out is not None:
            return out
    key = _fast_key("rms_norm", x, normalized_shape, weight, None, eps, residual, backend)
    hit = _validated.get(key) if key is not None else None
    if hit is not None:
        return _kernel("rms_norm", hit[0], x, hit[1], weight, None, hit[2], None)
    shape = _check("rms_norm", x, normalized_shape, weight, None, residual, eps)
    x, weight, _, residual = _harmonize(x, weight, None, residual)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _norm("rms_norm", x, shape, weight, None, eps, residual, backend, key)


backends.register_op("layer_norm", _describe("layer_norm"))
backends.register_op("rms_norm", _describe("rms_norm"))
