"""GELU's tanh approximation (GPT-2's gelu_new, torch's ``approximate="tanh"``) in Triton, forward and backward.

    y = 0.5 x (1 + tanh(u)),  u = sqrt(2 / pi) (x + 0.044715 x^3)

evaluated as y = x s with s = sigmoid(2u) = 1 / (1 + exp(-2u)) (0.5 (1 + tanh u) is exactly sigmoid(2u)):
one exp per element and no cancellation in 1 + tanh(u). Gradient: dy/dx = s + x s (1 - s) d(2u)/dx.
Elementwise over the flattened contiguous tensor, BLOCK elements per program, math in fp32.

    gelu_tanh_fwd(x) -> y;  gelu_tanh_bwd(dy, x) -> dx      (the contract of csrc/pyllm.cpp)

On CPU tensors this runs only under the Triton interpreter (TRITON_INTERPRET=1); there bf16 outputs are
rounded in software (the interpreter of triton 3.9 truncates fp32 -> bf16).
"""

import torch
import triton
import triton.language as tl

from .layer_norm import _round_to

__all__ = ["gelu_tanh_fwd", "gelu_tanh_bwd"]

_K2 = 2 * 0.7978845608028654  # 2 sqrt(2 / pi)
_K2C = 2 * 0.7978845608028654 * 0.044715


@triton.jit
def _sigmoid_2u(x, K2: tl.constexpr, K2C: tl.constexpr):
    return 1.0 / (1.0 + tl.exp(-(x * (K2 + K2C * x * x))))


@triton.jit
def _gelu_tanh_kernel(X, G, Y, n, BACKWARD: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr,
                      K2: tl.constexpr, K2C: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    s = _sigmoid_2u(x, K2, K2C)
    if BACKWARD:
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        y = g * (s + x * s * (1.0 - s) * (K2 + 3.0 * K2C * x * x))
    else:
        y = x * s
    tl.store(Y + offs, _round_to(y, Y.dtype.element_ty, SOFT_BF16), mask=m)


def _check(name, t, like=None):
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not t.is_contiguous():
        raise ValueError(f"gelu_tanh: {name} must be a contiguous fp32/fp16/bf16 tensor, got {t.dtype} "
                         f"with strides {tuple(t.stride())}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype):
        raise ValueError(f"gelu_tanh: {name} must have x's shape {tuple(like.shape)} and dtype {like.dtype}, "
                         f"got {tuple(t.shape)} {t.dtype}")


def _launch(x, g):
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        block = 1024
        _gelu_tanh_kernel[(triton.cdiv(n, block),)](x, g if g is not None else x, y, n, BACKWARD=g is not None,
                                                    SOFT_BF16=x.device.type == "cpu", BLOCK=block, K2=_K2, K2C=_K2C)
    return y


def gelu_tanh_fwd(x):
    """x contiguous (any shape) -> y = gelu_tanh(x), x's shape and dtype."""
    _check("x", x)
    return _launch(x, None)


def gelu_tanh_bwd(dy, x):
    """dy, x contiguous, same shape and dtype -> dx = dy * gelu_tanh'(x)."""
    _check("x", x)
    _check("dy", dy, x)
    return _launch(x, dy)
