"""Attention ops: ``pyllm.attention`` (pyllm's layout) and the drop-in ``scaled_dot_product_attention``.

Validation happens here, once, before any kernel; then :mod:`pyllm.backends` picks who serves the call.
The kernel backends (cpu, cuda, triton) run FlashAttention-2: memory linear in sequence length.

Causal alignment of ``pyllm.attention`` is bottom-right (FlashAttention 2.1+), e.g. Nq=2, Nk=5::

    keys ->   0 1 2 3 4
    query 0:  1 1 1 1 0
    query 1:  1 1 1 1 1

so one new query against a KV cache sees the whole cache. torch's SDPA is top-left; the drop-in keeps it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyllm import backends, reference
from pyllm.ops import _checks


def _check(q, k, v, key_padding_mask, softmax_scale) -> None:
    fn = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(fn, name, t, ndim=4)
    _checks.optional_tensor(fn, "key_padding_mask", key_padding_mask, "a bool tensor (True = real token)")
    _checks.same_dtype(fn, "q", q, k=k, v=v)
    _checks.same_device(fn, "q", q, k=k, v=v, key_padding_mask=key_padding_mask)
    B, Nq, Hq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != B:
            raise ValueError(f"{fn}: {name} has batch {t.shape[0]} but q has {B}")
        if t.shape[3] != D:
            raise ValueError(f"{fn}: {name} has head_dim {t.shape[3]} but q has {D}")
    if D == 0:
        raise ValueError(f"{fn}: head_dim must be at least 1, got q of shape {tuple(q.shape)}")
    if v.shape[1:3] != k.shape[1:3]:
        raise ValueError(f"{fn}: v has (seqlen, heads) {tuple(v.shape[1:3])} but k has {tuple(k.shape[1:3])}")
    Nk, Hkv = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{fn}: q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) (GQA/MQA)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"{fn}: key_padding_mask must be a bool tensor (True = real token), got {got}")
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(
                f"{fn}: key_padding_mask must have shape (batch, seqlen_k) = {(B, Nk)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
    _checks.scale(fn, "softmax_scale", softmax_scale)


def _call(q: Tensor, k: Tensor, extra: list[str] | None = None) -> dict:
    unsupported = list(extra or [])
    if q.numel() == 0 or k.numel() == 0:
        unsupported.append("empty q or k (served by the reference)")
    return {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "unsupported": unsupported}


def _kernel_fwd(name: str):
    if name == "triton":
        return torch.ops.pyllm.triton_attention_fwd
    return torch.ops.pyllm.attention_fwd  # the C++ op: CPU or CUDA kernel by the tensors' device


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _run(q, k, v, causal, scale, key_padding_mask, return_lse, name):
    if name == "reference":
        o, lse = reference.attention(q, k, v, causal=causal, softmax_scale=scale,
                                     key_padding_mask=key_padding_mask, return_lse=True)
        return (o, lse.detach()) if return_lse else o
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    o, lse = _kernel_fwd(name)(q, k, v, key_padding_mask, causal, scale)
    return (o, lse.detach()) if return_lse else o


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Fused softmax attention, FlashAttention-2 style, forward and backward.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim).
        k, v: (batch, seqlen_k, heads_kv, head_dim); heads_q % heads_kv == 0 (GQA / MQA: query head h
            reads kv head h // (heads_q // heads_kv); K/V are never copied per head).
            Only the last dim needs to be contiguous: pass transposed or sliced views freely.
        causal: bottom-right aligned mask: query i sees key j iff j <= i + seqlen_k - seqlen_q.
        softmax_scale: defaults to 1 / sqrt(head_dim).
        key_padding_mask: (batch, seqlen_k) bool, True = a real token (Hugging Face's attention_mask == 1).
        return_lse: also return the log-sum-exp (batch, heads_q, seqlen_q) float32 (detached).
        backend: "auto" (default), "reference", "cpu", "cuda" or "triton".

    Returns:
        o (batch, seqlen_q, heads_q, head_dim) in q's dtype; a query row that sees no key gives zeros
        (and lse = -inf), never NaN, gradients included.
    """
    _check(q, k, v, key_padding_mask, softmax_scale)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    name = backends.select("attention", _call(q, k), backend)
    return _run(q, k, v, bool(causal), scale, key_padding_mask, return_lse, name)


def _describe_attention(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, **_):
    _check(q, k, v, key_padding_mask, softmax_scale)
    return "attention", _call(q, k)


# ---------------------------------------------------------------- the SDPA drop-in
def _sdpa_check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    fn = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        _checks.tensor(fn, name, t)
        if t.dim() < 2:
            raise ValueError(f"{fn}: {name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    _checks.optional_tensor(fn, "attn_mask", attn_mask, "a bool or floating-point tensor")
    _checks.same_dtype(fn, "query", query, key=key, value=value)
    _checks.same_device(fn, "query", query, key=key, value=value, attn_mask=attn_mask)
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{fn}: key has embedding dim {key.shape[-1]} but query has {query.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{fn}: value has seqlen {value.shape[-2]} but key has {key.shape[-2]}")
    if attn_mask is not None and is_causal:
        raise ValueError(f"{fn}: pass either attn_mask or is_causal=True, not both (as torch requires)")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"{fn}: attn_mask must be bool or floating point (added to the scores), "
                        f"got {_checks._dt(attn_mask.dtype)}")
    _checks.scale(fn, "scale", scale)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1], got {dropout_p}")
    if query.dim() >= 3 and key.dim() >= 3:
        hq, hk = query.shape[-3], key.shape[-3]
        if hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0):
            raise ValueError(
                f"{fn}: query has {hq} heads but key has {hk}; different head counts need enable_gqa=True "
                f"and query heads a multiple of key heads"
            )


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal):
    """Map an SDPA call onto pyllm.attention: (key_padding_mask, reasons it cannot be mapped)."""
    reasons = []
    if dropout_p > 0.0:
        reasons.append("dropout_p > 0 is served by the reference")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        reasons.append("only 4-D (batch, heads, L, E) inputs map onto the kernels")
    elif not (query.shape[0] == key.shape[0] == value.shape[0]):
        reasons.append("broadcast batch dims are served by the reference")
    if value.shape[-1] != query.shape[-1]:
        reasons.append("value's embedding dim differs from query's")
    if is_causal and query.shape[-2] != key.shape[-2]:
        reasons.append("top-left causal with L != S is served by the reference (kernels align bottom-right)")
    kpm = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype != torch.bool:
            reasons.append("float attn_mask is served by the reference")
        elif m.dim() > 4 or any(s != 1 for s in m.shape[-3:-1]) or m.shape[-1] != key.shape[-2]:
            reasons.append("only key-padding bool masks (B or 1, 1, 1, S) map onto the kernels")
        elif not reasons:
            m = m.reshape((-1,) + tuple(m.shape[-1:])) if m.dim() >= 2 else m[None]
            if m.shape[0] not in (1, query.shape[0]):
                reasons.append("attn_mask batch does not match query batch")
            else:
                kpm = m.expand(query.shape[0], key.shape[-2]).contiguous()
    return kpm, reasons


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature and semantics.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev).
    Causal is top-left (torch's); a bool attn_mask is True where attention is allowed, a float mask is
    added. Calls that map onto the kernels (4-D, no dropout, a key-padding bool mask or none, causal with
    L == S) run fused; everything else runs on the reference path -- never a wrong answer. Rows that see
    no key give zeros rather than torch's NaN.
    """
    _sdpa_check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    kpm, reasons = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal)
    name = backends.select("attention", _call(query, key, reasons), backend)
    if name == "reference":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, upcast=True
        )
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, E) views, no copies
    o = _run(q, k, v, bool(is_causal), scale, kpm, False, name)
    return o.transpose(1, 2)


def _describe_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, **_):
    _sdpa_check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _, reasons = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal)
    return "attention", _call(query, key, reasons)


backends.register_op("attention", _describe_attention)
backends.register_op("scaled_dot_product_attention", _describe_sdpa)
