"""Rotary position embeddings: ``pyllm.rotary`` rotates q and k in one call, forward and backward.

Validation happens here, once; then :mod:`pyllm.backends` picks who serves the call. The kernel ops
(``pyllm::rotary`` in C++ for CPU and CUDA, ``pyllm::triton_rotary``) take cos/sin as contiguous
float32 (float64 for fp64 inputs) tables of shape (1 or batch, seqlen, rotary_dim / 2); the backward
pass is the same op rotating by -theta (``pyllm::rotary``'s autograd is registered in C++, csrc/autograd.cpp,
so a no-grad call pays nothing for it; the Triton op's in :mod:`pyllm.ops._autograd`). A Llama decode step makes
one call per layer: the common call on CPU tensors is recognized in C++ (``pyllm._C.rotary_fast``, as the norms'
and attention's, :mod:`pyllm.ops._fast`), and a call whose arguments' metadata was validated before skips the checks.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from pyllm import backends, reference
from pyllm.ops import _checks, _fast


def _table(name: str, t, B: int, N: int, D: int) -> tuple[int, ...]:
    if not isinstance(t, Tensor) or t.dim() not in (2, 3) or not t.is_floating_point():
        got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"rotary: {name} must be a float tensor (seqlen, rotary_dim / 2) or "
                         f"(batch or 1, seqlen, rotary_dim / 2), got {got}")
    shape = tuple(t.shape) if t.dim() == 3 else (1, *t.shape)
    if shape[0] not in (1, B) or shape[1] != N or not 1 <= 2 * shape[2] <= D:
        raise ValueError(f"rotary: {name} has shape {tuple(t.shape)}; expected (1 or {B}, {N}, r) or ({N}, r) "
                         f"with 1 <= 2r <= head_dim {D}")
    return shape


def _check(q, k, cos, sin) -> None:
    fn = "rotary"
    _checks.tensor(fn, "q", q, ndim=4)
    _checks.tensor(fn, "k", k, ndim=4)
    _checks.same_dtype(fn, "q", q, k=k)
    B, N, _, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, N, D):
        raise ValueError(f"rotary: k has (batch, seqlen, head_dim) {(k.shape[0], k.shape[1], k.shape[3])} but q has "
                         f"{(B, N, D)}")
    if _table("cos", cos, B, N, D) != _table("sin", sin, B, N, D):
        raise ValueError(f"rotary: sin has shape {tuple(sin.shape)} but cos has {tuple(cos.shape)}")
    _checks.same_device(fn, "q", q, k=k, cos=cos, sin=sin)


def _call(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> dict:
    unsupported = []
    if q.numel() == 0 or k.numel() == 0:
        unsupported.append("empty q or k (served by the reference)")
    if cos.requires_grad or sin.requires_grad:
        unsupported.append("cos/sin that require grad (the kernels give no gradient to the tables)")
    return {"device": q.device, "dtype": q.dtype, "unsupported": unsupported}


def _kernel(name: str):
    if name == "triton":
        return torch.ops.pyllm.triton_rotary
    return torch.ops.pyllm.rotary  # the C++ op: CPU or CUDA kernel by the tensors' device


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
           backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Rotary position embeddings (RoPE) applied to q and k in one call, forward and backward.

    Args:
        q: (batch, seqlen, heads_q, head_dim); k: (batch, seqlen, heads_k, head_dim), same dtype.
            Only the last dim needs to be contiguous (slices of a packed qkv projection go in as views).
        cos, sin: (seqlen, r) or (batch or 1, seqlen, r), r = rotary_dim / 2 <= head_dim / 2: the
            cosines and sines of each position's angles theta_i = position * inv_freq[i] (what
            ``pyllm.models.llama.RotaryEmbedding`` returns). No gradient flows to them on the kernel
            backends; tables that require grad are served by the reference.
        interleaved: False (default) rotates the pairs (x[i], x[i + r]), the rotate-half layout of
            GPT-NeoX, Llama, Qwen2 and Mistral weights; True rotates (x[2i], x[2i + 1]) (GPT-J).
        backend: "auto" (default), "reference", "cpu", "cuda" or "triton".

    Returns:
        (q_out, k_out), shaped and typed like q and k: each pair becomes (x1 cos - x2 sin,
        x2 cos + x1 sin); dims 2r..head_dim are copied unchanged (partial rotary). Math in fp32.
    """
    if (_FAST is not None and backend in _fast.CPU_CHOICES and backends._current in _fast.CPU_CHOICES
            and not torch.compiler.is_compiling()):
        out = _FAST(q, k, cos, sin, interleaved)  # the common call on CPU tensors, in C++ (pyllm.ops._fast)
        if out is not None:
            return out
    key = _key(q, k, cos, sin, backend)
    name = _validated.get(key) if key is not None else None
    if name is None:
        _check(q, k, cos, sin)
        name = backends.select("rotary", _call(q, k, cos, sin), backend)
        if key is not None:
            if len(_validated) > 1024:
                _validated.clear()
            _validated[key] = name
    if name == "reference":
        return reference.rotary(q, k, cos, sin, interleaved=bool(interleaved))
    table = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not (cos.dim() == 3 and cos.dtype == table and cos.is_contiguous()):
        cos = cos.reshape((1, *cos.shape) if cos.dim() == 2 else cos.shape).to(table).contiguous()
    if not (sin.dim() == 3 and sin.dtype == table and sin.is_contiguous()):
        sin = sin.reshape((1, *sin.shape) if sin.dim() == 2 else sin.shape).to(table).contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return _kernel(name)(q, k, cos, sin, bool(interleaved), False)


# Small calls (a decode step makes one per layer): the common call on CPU tensors is recognized in C++
# (pyllm.ops._fast); for the others the checks and the backend choice depend only on the arguments' metadata, so
# a call whose metadata was validated before skips them (the key holds no tensor).
_validated: dict = {}
_FAST = _fast.load("rotary_fast", ("rotary",))


def _key(q, k, cos, sin, backend):
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(cos, Tensor) and isinstance(sin, Tensor)) \
            or torch.compiler.is_compiling():
        return None
    return (q.shape, k.shape, cos.shape, sin.shape, q.dtype, k.dtype, cos.dtype, sin.dtype, q.device, k.device,
            cos.device, sin.device, cos.requires_grad, sin.requires_grad, backends.requested(backend),
            os.environ.get("TRITON_INTERPRET"))


def _describe(q, k, cos, sin, **_):
    _check(q, k, cos, sin)
    return "rotary", _call(q, k, cos, sin)


backends.register_op("rotary", _describe)
