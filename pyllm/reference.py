"""The truth: attention, LayerNorm/RMSNorm, rotary embeddings and GELU in plain PyTorch.

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


# ---------------------------------------------------------------- dropout: Philox4x32-10
# The dropout mask is a pure function of (seed, offset, element index): every backend (C++, CUDA,
# Triton's tl.randint) computes the same bits. Element (b, h, i, j) of a (B, H, Nq, Nk) score tensor has
# index ((b * H + h) * Nq + i) * Nk + j (for packed batches: Nq, Nk = max_seqlen_q, max_seqlen_k, so a
# packed batch drops exactly what its padded twin drops). Its 32 random bits are word 0 of
# Philox4x32-10 with counter (lo32(offset + index), hi32(offset + index), 0, 0) and key
# (lo32(seed), hi32(seed)) -- Triton's ``tl.randint(seed, offset + index)``. The element is kept iff
# bits >= dropout_threshold(p) = min(floor(p * 2**32), 2**32 - 1), an integer compare on every backend;
# kept probabilities are scaled by 1 / (1 - p).
_M32 = 0xFFFFFFFF
_PHILOX_A, _PHILOX_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KA, _PHILOX_KB = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * m for a (int64 tensor of uint32 values) and a 32-bit constant m."""
    p_lo = a * (m & 0xFFFF)  # < 2**48: exact in int64
    p_hi = a * (m >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _M32


def philox_bits(seed: int, counter: Tensor) -> Tensor:
    """Word 0 of Philox4x32-10 for int64 counters (as Triton's ``tl.randint(seed, counter)``), int64 in [0, 2**32)."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KA) & _M32, (k1 + _PHILOX_KB) & _M32
    return c0


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which an element is dropped (p in [0, 1))."""
    return min(int(p * 4294967296.0), _M32)


def dropout_keep(seed: int, offset: int, p: float, index: Tensor) -> Tensor:
    """Bool keep-mask for the elements with these linear indices (int64 tensor; see the comment above)."""
    return philox_bits(seed, index + offset) >= dropout_threshold(p)


def dropout_mask(seed: int, offset: int, p: float, B: int, H: int, Nq: int, Nk: int, device=None) -> Tensor:
    """The (B, H, Nq, Nk) bool keep-mask of ``pyllm.attention(..., dropout_p=p)`` for this seed and offset."""
    index = torch.arange(B * H * Nq * Nk, device=device, dtype=torch.int64).view(B, H, Nq, Nk)
    return dropout_keep(seed, offset, p, index)


# ---------------------------------------------------------------- attention
def _visible(Nq: int, Nk: int, causal: bool, window_size, device) -> Tensor | None:
    """(Nq, Nk) bool: key j visible to query i under causal / window (bottom-right aligned), None = all."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    d = torch.arange(Nk, device=device)[None, :] - torch.arange(Nq, device=device)[:, None] - (Nk - Nq)  # j - i'
    vis = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    if right >= 0:
        vis &= d <= right
    if left >= 0:
        vis &= d >= -left
    return vis


def _scores(qf, kf, scale, *, causal, key_padding_mask, window_size, softcap, alibi_slopes, attn_bias, mdt):
    """Masked scores (B, H, Nq, Nk) in the math dtype: scale q.k, softcap, + ALiBi + bias, then -inf masks.

    qf: (B, H, Nq, D), kf: (B, H, Nk, D) already in mdt and GQA-expanded.
    """
    Nq, Nk = qf.shape[-2], kf.shape[-2]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        dist = (torch.arange(Nq, device=qf.device)[:, None] + (Nk - Nq)
                - torch.arange(Nk, device=qf.device)[None, :]).abs().to(mdt)
        slopes = alibi_slopes.to(mdt)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * dist
    if attn_bias is not None:
        s = s + attn_bias.to(mdt)
    vis = _visible(Nq, Nk, causal, window_size, qf.device)
    if vis is not None or key_padding_mask is not None:
        full = torch.ones(Nq, Nk, dtype=torch.bool, device=qf.device) if vis is None else vis
        full = full.expand(s.shape[0], 1, Nq, Nk)
        if key_padding_mask is not None:
            full = full & key_padding_mask.to(torch.bool)[:, None, None, :]
        s = s.masked_fill(~full, float("-inf"))
    return s


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: tuple[int, int] | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    attn_bias: Tensor | None = None,
    upcast: bool | torch.dtype = True,
    return_lse: bool = False,
    _dropout_index: Tensor | None = None,
):
    """Softmax attention in pyllm's layout and conventions (see :func:`pyllm.attention`).

    q: (B, Nq, Hq, D); k, v: (B, Nk, Hkv, D) with Hq % Hkv == 0; key_padding_mask: (B, Nk) bool, True = real.
    causal is bottom-right aligned: query i sees key j iff j <= i + Nk - Nq; window_size (left, right)
    keeps i + Nk - Nq - left <= j <= i + Nk - Nq + right (-1 = unbounded). Score of (i, j):
    ``softcap * tanh(scale q.k / softcap) - slope * |i + Nk - Nq - j| + attn_bias`` (each term when given).
    Dropout (``dropout_p`` > 0) uses the Philox mask of :func:`dropout_mask` for ``dropout_seed`` =
    (seed, offset), drawn from torch's default generator when None. Rows that see no key give 0 and
    lse = -inf (lse is taken before dropout). Returns o (B, Nq, Hq, D) in q.dtype, and lse (B, Hq, Nq)
    float32 when return_lse.
    """
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    mdt = _math_dtype(q.dtype, upcast)
    qf, kf, vf = (t.to(mdt).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    if Hq != Hkv:  # GQA: query head h reads kv head h // (Hq // Hkv)
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = _scores(qf, kf, scale, causal=causal, key_padding_mask=key_padding_mask, window_size=tuple(window_size),
                softcap=softcap, alibi_slopes=alibi_slopes, attn_bias=attn_bias, mdt=mdt)  # (B, Hq, Nq, Nk)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Nq); -inf where a row sees nothing
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # exp(-inf)=0 on masked entries
    if dropout_p > 0.0:
        seed, offset = draw_dropout_seed() if dropout_seed is None else dropout_seed
        if _dropout_index is None:
            keep = dropout_mask(seed, offset, dropout_p, B, Hq, Nq, Nk, device=q.device)
        else:
            keep = dropout_keep(seed, offset, dropout_p, _dropout_index)
        p = p * keep.to(mdt) * (1.0 / (1.0 - dropout_p))
    o = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)  # (B, Nq, Hq, D)
    if return_lse:
        return o, lse.to(torch.float64 if mdt == torch.float64 else torch.float32)
    return o


def draw_dropout_rng() -> Tensor:
    """(seed, offset) for one dropout call as a (2,) int64 CPU tensor, drawn with torch ops from torch's default
    generator: torch.manual_seed reproduces it, and torch.compile(fullgraph=True) traces it (no Python ints).
    seed < 2**62, offset < 2**40 so offset + element index never overflows."""
    r = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    return torch.stack([r[0], r[1] >> 22])


def draw_dropout_seed() -> tuple[int, int]:
    """:func:`draw_dropout_rng` as Python ints (seed, offset)."""
    seed, offset = draw_dropout_rng().tolist()
    return seed, offset


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: tuple[int, int] | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    upcast: bool | torch.dtype = True,
    return_lse: bool = False,
):
    """Packed variable-length attention (see :func:`pyllm.attention_varlen`): each sequence b is
    q[cu_q[b]:cu_q[b+1]] against k/v[cu_k[b]:cu_k[b+1]], with :func:`attention`'s semantics (causal and
    window aligned bottom-right per sequence). q (total_q, Hq, D), k/v (total_k, Hkv, D) -> o like q,
    lse (Hq, total_q) float32. Dropout index of (b, h, i, j): ((b * Hq + h) * max_seqlen_q + i) * max_seqlen_k + j."""
    Hq = q.shape[1]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        index = None
        if dropout_p > 0.0:
            ar = lambda n: torch.arange(n, device=q.device, dtype=torch.int64)  # noqa: E731
            index = (((b * Hq + ar(Hq)[:, None, None]) * max_seqlen_q + ar(nq)[None, :, None]) * max_seqlen_k
                     + ar(nk)[None, None, :])[None]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        o, lse = attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                           causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
                           dropout_seed=dropout_seed, window_size=window_size, softcap=softcap,
                           alibi_slopes=slopes, upcast=upcast, return_lse=True, _dropout_index=index)
        outs.append(o[0])
        lses.append(lse[0])
    o = torch.cat(outs) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return o
    return o, (torch.cat(lses, dim=1) if lses else q.new_zeros((Hq, 0), dtype=torch.float32))


def attention_probs(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    attn_bias: Tensor | None = None,
    lse: Tensor | None = None,
    heads=None,
    upcast: bool | torch.dtype = True,
) -> Tensor:
    """Softmax probabilities (B, len(heads), Nq, Nk) in q.dtype (before dropout), one head at a time.

    With ``lse`` (B, Hq, Nq) from ``attention(..., return_lse=True)`` they are exp(score - lse), exactly
    what the kernels used; without it the softmax is recomputed. Rows that see no key are zeros.
    """
    B, Nq, Hq, D = q.shape
    Hkv = k.shape[2]
    heads = list(range(Hq)) if heads is None else [int(h) for h in heads]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    mdt = _math_dtype(q.dtype, upcast)
    out = []
    for h in heads:
        g = h // (Hq // Hkv)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[h:h + 1] if alibi_slopes.dim() == 1 else alibi_slopes[:, h:h + 1]
        bias = None
        if attn_bias is not None:  # broadcastable to (B, Hq, Nq, Nk): take head h where it has heads
            bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
            bias = bias[:, h:h + 1] if bias.shape[1] > 1 else bias
        s = _scores(q[:, :, h:h + 1].to(mdt).transpose(1, 2), k[:, :, g:g + 1].to(mdt).transpose(1, 2), scale,
                    causal=causal, key_padding_mask=key_padding_mask, window_size=tuple(window_size),
                    softcap=softcap, alibi_slopes=slopes, attn_bias=bias, mdt=mdt)  # (B, 1, Nq, Nk)
        ls = torch.logsumexp(s, dim=-1) if lse is None else lse[:, h:h + 1].to(mdt)
        out.append(torch.exp(s - ls.masked_fill(torch.isinf(ls), 0.0)[..., None]).to(q.dtype))
    return torch.cat(out, dim=1) if out else q.new_zeros((B, 0, Nq, k.shape[1]))


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
    m = s.amax(dim=-1, keepdim=True) if S else s.new_zeros(s.shape[:-1] + (1,))  # S = 0: torch returns zeros
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


def rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    interleaved: bool = False,
    conjugate: bool = False,
    upcast: bool | torch.dtype = True,
):
    """Rotary position embeddings on q (B, N, Hq, D) and k (B, N, Hk, D); see :func:`pyllm.rotary`.

    cos, sin: (N, R/2) or (1 or B, N, R/2), R <= D. Pairs (x[i], x[i + R/2]) (rotate-half), or (x[2i],
    x[2i + 1]) when interleaved, are rotated: (x1 cos - x2 sin, x2 cos + x1 sin); conjugate rotates by
    -theta. Dims R..D are copied. Returns (q_out, k_out) in the inputs' dtypes.
    """
    return (_rotate(q, cos, sin, interleaved, conjugate, upcast),
            _rotate(k, cos, sin, interleaved, conjugate, upcast))


def _rotate(x, cos, sin, interleaved, conjugate, upcast):
    mdt = _math_dtype(x.dtype, upcast)
    cos, sin = (t if t.dim() == 3 else t[None] for t in (cos, sin))
    R = 2 * cos.shape[-1]
    c = cos.to(mdt)[:, :, None]  # (1 or B, N, 1, R/2)
    s = sin.to(mdt)[:, :, None] * (-1 if conjugate else 1)
    xr = x[..., :R].to(mdt)
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = torch.stack([o1, o2], dim=-1).flatten(-2) if interleaved else torch.cat([o1, o2], dim=-1)
    return torch.cat([out.to(x.dtype), x[..., R:]], dim=-1)


def gelu_tanh(x: Tensor, *, upcast: bool | torch.dtype = True) -> Tensor:
    """GELU's tanh approximation ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` (torch's own formula,
    ``F.gelu(approximate="tanh")``), computed in fp32 (``upcast``: as :func:`layer_norm`); x's dtype out."""
    return torch.nn.functional.gelu(x.to(_math_dtype(x.dtype, upcast)), approximate="tanh").to(x.dtype)


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
