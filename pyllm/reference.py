"""The truth: attention and LayerNorm/RMSNorm in plain PyTorch.

Every backend is checked against these functions (tests, ``pyllm check``), and the ``reference``
backend serves calls with them. ``upcast=True`` computes in float32 (float64 stays float64; pass
``upcast=torch.float64`` to force fp64 math) and casts the result back to the input dtype; ``upcast=False``
computes in the inputs' own precision, which is what PyTorch's own low-precision error is measured with.
Memory is quadratic in sequence length here: this is the slow path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _math_dtype(dtype: torch.dtype, upcast: bool | torch.dtype) -> torch.dtype:
    if isinstance(upcast, torch.dtype):
        return upcast
    if upcast and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    upcast: bool | torch.dtype = True,
    return_lse: bool = False,
):
    """Softmax attention in pyllm's layout and conventions (see :func:`pyllm.attention`).

    q: (B, Nq, Hq, D); k, v: (B, Nk, Hkv, D) with Hq % Hkv == 0; key_padding_mask: (B, Nk) bool, True = real.
    causal is bottom-right aligned: query i sees key j iff j <= i + Nk - Nq. Rows that see no key give 0
    and lse = -inf. Returns o (B, Nq, Hq, D) in q.dtype, and lse (B, Hq, Nq) float32 when return_lse.
    """
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    mdt = _math_dtype(q.dtype, upcast)
    qf, kf, vf = (t.to(mdt).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    if Hq != Hkv:  # GQA: query head h reads kv head h // (Hq // Hkv)
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    visible = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.ones_like(visible).tril(Nk - Nq)
    visible = visible.expand(B, 1, Nq, Nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(torch.bool)[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Nq); -inf where a row sees nothing
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # exp(-inf)=0 on masked entries
    o = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)  # (B, Nq, Hq, D)
    if return_lse:
        return o, lse.to(torch.float64 if mdt == torch.float64 else torch.float32)
    return o


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
    upcast: bool | torch.dtype = False,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's math, written out: layout (..., H, L, E).

    Top-left causal; a bool mask is True where attention is allowed, a float mask is added to the scores.
    Unlike torch's math path, a row that sees no key returns zeros rather than NaN.
    """
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    mdt = _math_dtype(query.dtype, upcast)
    q, k, v = query.to(mdt), key.to(mdt), value.to(mdt)
    if enable_gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., L, S)
    allowed = None
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            s = s + attn_mask.to(mdt)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    return torch.matmul(p, v).to(query.dtype)


def layer_norm(
    x: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    upcast: bool | torch.dtype = True,
):
    """LayerNorm over the trailing ``normalized_shape`` dims; with ``residual`` returns (norm(x + r), x + r)."""
    h = x if residual is None else x + residual  # the sum is rounded to x.dtype, as the kernels store it
    dims = tuple(range(-len(_shape(normalized_shape)), 0))
    mdt = _math_dtype(x.dtype, upcast)
    hf = h.to(mdt)
    mean = hf.mean(dim=dims, keepdim=True)
    var = (hf - mean).square().mean(dim=dims, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(mdt)
    if bias is not None:
        y = y + bias.to(mdt)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(
    x: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    residual: Tensor | None = None,
    upcast: bool | torch.dtype = True,
):
    """RMSNorm over the trailing dims: x / sqrt(mean(x^2) + eps) * weight; eps None = finfo(x.dtype).eps."""
    h = x if residual is None else x + residual
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    dims = tuple(range(-len(_shape(normalized_shape)), 0))
    mdt = _math_dtype(x.dtype, upcast)
    hf = h.to(mdt)
    y = hf * torch.rsqrt(hf.square().mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(mdt)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def _shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    z_loss: float = 0.0,
    upcast: bool | torch.dtype = True,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels)`` with the whole (N, V) logits stored.

    hidden (..., H), weight (V, H), bias (V,), labels (...) int64 with ``ignore_index`` rows skipped.
    ``softcap`` caps the logits first (``softcap * tanh(logits / softcap)``, Gemma); ``z_loss`` adds
    ``z_loss * logsumexp(logits)^2`` per non-ignored token. ``reduction="mean"`` divides by the number of
    non-ignored tokens; with none it returns 0 (torch's ``F.cross_entropy`` returns NaN there).
    Returns a 0-d tensor, float32 for fp16/bf16 inputs with ``upcast`` (else the math dtype).
    """
    import torch.nn.functional as F

    mdt = _math_dtype(hidden.dtype, upcast)
    logits = F.linear(hidden.to(mdt), weight.to(mdt), None if bias is None else bias.to(mdt))
    logits = logits.reshape(-1, weight.shape[0])  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="sum")
    valid = labels != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0).sum()
    if reduction == "mean":
        loss = loss / valid.sum().clamp(min=1)
    return loss
