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

import dataclasses
import math
import os

import torch
from torch import Tensor

from pyllm import backends, reference
from pyllm.ops import _autograd, _checks, _fast


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


def _call(q: Tensor, k: Tensor, extra: list[str] | None = None, features: tuple[str, ...] = ()) -> dict:
    unsupported = list(extra or [])
    if q.numel() == 0 or k.numel() == 0:
        unsupported.append("empty q or k (served by the reference)")
    return {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "unsupported": unsupported,
            "features": features}


def _kernel_fwd(name: str):
    if name == "triton":
        return torch.ops.pyllm.triton_attention_fwd
    return torch.ops.pyllm.attention_fwd  # the C++ op: CPU or CUDA kernel by the tensors' device


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _run(q, k, v, causal, scale, key_padding_mask, return_lse, name, ext: Extras | None = None):
    if ext is not None and ext.features():
        return _run_extras(q, k, v, causal, scale, key_padding_mask, return_lse, name, ext)
    if name == "reference":
        o, lse = reference.attention(q, k, v, causal=causal, softmax_scale=scale,
                                     key_padding_mask=key_padding_mask, return_lse=True)
        return (o, lse.detach()) if return_lse else o
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    o, lse = _autograd.call(_kernel_fwd(name), q, k, v, key_padding_mask, causal, scale)
    return (o, lse.detach()) if return_lse else o


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    attn_bias: Tensor | None = None,
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
        dropout_p: dropout on the attention probabilities, in [0, 1). The mask is Philox keyed by a seed
            drawn from torch's default generator (torch.manual_seed reproduces it); every backend draws the
            same mask (:func:`pyllm.reference.dropout_mask`). Pass 0 at evaluation time.
        window_size: (left, right): query i sees keys i + seqlen_k - seqlen_q - left .. + right; -1 =
            unbounded. With causal, right is 0.
        softcap: > 0 replaces the scaled score s by softcap * tanh(s / softcap) (Gemma-2).
        alibi_slopes: (heads_q,) or (batch, heads_q) float32: adds -slope * |i + seqlen_k - seqlen_q - j|
            (FlashAttention's convention); no gradient.
        attn_bias: additive bias broadcastable to (batch, heads_q, seqlen_q, seqlen_k) (each of batch and
            heads may be 1); its gradient, summed over broadcast dims, flows when it requires grad.
            Score order: scale * q.k, softcap, + ALiBi + attn_bias, masks, softmax, dropout.
        return_lse: also return the log-sum-exp (batch, heads_q, seqlen_q) float32 (detached).
        backend: "auto" (default), "reference", "cpu", "cuda" or "triton".

    Returns:
        o (batch, seqlen_q, heads_q, head_dim) in q's dtype; a query row that sees no key gives zeros
        (and lse = -inf), never NaN, gradients included.
    """
    plain = (type(dropout_p) is float and dropout_p == 0.0 and type(window_size) is tuple
             and window_size == (-1, -1) and type(softcap) is float and softcap == 0.0 and alibi_slopes is None
             and attn_bias is None)  # the feature defaults: nothing to validate for them
    if (plain and _FAST is not None and not return_lse and backend in _CPU
            and backends._current in _CPU and not torch.compiler.is_compiling()):
        o = _FAST(q, k, v, causal, softmax_scale, key_padding_mask)  # the common call on CPU tensors, in C++
        if o is not None:
            return o
    key = _fast_key(q, k, v, key_padding_mask, softmax_scale, backend) if plain else None
    name = _validated.get(key) if key is not None else None
    ext = None
    if name is None:
        _check(q, k, v, key_padding_mask, softmax_scale)
        if not plain:
            ext = check_extras("attention", q, k, dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes, attn_bias=attn_bias)
        name = backends.select("attention", _call(q, k, features=ext.features() if ext else ()), backend)
        if key is not None:
            if len(_validated) > 1024:
                _validated.clear()
            _validated[key] = name
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    return _run(q, k, v, bool(causal), scale, key_padding_mask, return_lse, name, ext)


# Small calls (issue 15): the checks and the backend choice of a call without features depend only on its
# arguments' metadata, so a call whose metadata was validated before skips them. The key holds no tensor.
# (The common call on CPU tensors is recognized in C++ before that: pyllm.ops._fast.)
_validated: dict = {}
_FAST = _fast.load("attention_fast", ("attention",))
_CPU = _fast.CPU_CHOICES


def _fast_key(q, k, v, key_padding_mask, softmax_scale, backend):
    if (not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor))
            or not (softmax_scale is None or type(softmax_scale) is float) or torch.compiler.is_compiling()):
        return None
    m = key_padding_mask
    if m is not None:
        if not isinstance(m, Tensor):
            return None
        m = (m.shape, m.dtype, m.device)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, m, softmax_scale,
            backends.requested(backend), os.environ.get("TRITON_INTERPRET"))


def _describe_attention(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, dropout_p=0.0,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, attn_bias=None, **_):
    _check(q, k, v, key_padding_mask, softmax_scale)
    ext = check_extras("attention", q, k, dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                       alibi_slopes=alibi_slopes, attn_bias=attn_bias)
    return "attention", _call(q, k, features=ext.features())


# ---------------------------------------------------------------- FlashAttention's feature set
# dropout, sliding window, softcap, ALiBi, additive bias (attention), packed sequences (attention_varlen),
# attention maps (attention_probs). Each new argument is validated here, once; backends declare which
# features their kernels implement (backends.Backend.attention_features) and auto skips the others.
@dataclasses.dataclass(frozen=True)
class Extras:
    """The validated feature arguments of one attention call (attn_bias already a 4-D view)."""

    dropout_p: float = 0.0
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Tensor | None = None
    attn_bias: Tensor | None = None

    def features(self) -> tuple[str, ...]:
        on = {"dropout": self.dropout_p > 0, "window": self.window_size != (-1, -1), "softcap": self.softcap > 0,
              "alibi": self.alibi_slopes is not None, "attn_bias": self.attn_bias is not None}
        return tuple(f for f, used in on.items() if used)


def _number(fn: str, name: str, x, expected: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{fn}: {name} must be {expected}, got {x!r}")
    return float(x)


def check_extras(fn: str, q: Tensor, k: Tensor, *, dropout_p=0.0, window_size=(-1, -1), softcap=0.0,
                 alibi_slopes=None, attn_bias=None, batch: int | None = None) -> Extras:
    """Validate the feature arguments against q (…, seqlen_q, heads_q, head_dim) and k; ``batch`` overrides
    q.shape[0] (packed sequences). Errors name the argument, the expected and the received."""
    p = _number(fn, "dropout_p", dropout_p, "a float in [0, 1)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p!r}")
    ws = tuple(window_size) if isinstance(window_size, (tuple, list)) else None
    if ws is None or len(ws) != 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in ws):
        raise ValueError(f"{fn}: window_size must be (left, right) ints >= -1 (-1 = unbounded), got {window_size!r}")
    cap = _number(fn, "softcap", softcap, "a finite float >= 0 (0 = off)")
    if cap < 0:
        raise ValueError(f"{fn}: softcap must be >= 0 (0 = off), got {softcap!r}")
    B = q.shape[0] if batch is None else batch
    Hq, Nq, Nk = q.shape[-2], q.shape[-3], k.shape[-3]
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or alibi_slopes.dtype not in (torch.float32, torch.float64):
            got = alibi_slopes.dtype if isinstance(alibi_slopes, Tensor) else type(alibi_slopes).__name__
            raise TypeError(f"{fn}: alibi_slopes must be a float32 tensor, got {got}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"{fn}: alibi_slopes must have shape (heads_q,) = ({Hq},) or (batch, heads_q) = "
                             f"{(B, Hq)}, got {tuple(alibi_slopes.shape)}")
        _checks.same_device(fn, "q", q, alibi_slopes=alibi_slopes)
        alibi_slopes = alibi_slopes.detach().float().contiguous()
    if attn_bias is not None:
        _checks.tensor(fn, "attn_bias", attn_bias)
        _checks.same_device(fn, "q", q, attn_bias=attn_bias)
        full = (B, Hq, Nq, Nk)
        shape = tuple(attn_bias.shape)
        if not 2 <= len(shape) <= 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
            raise ValueError(f"{fn}: attn_bias must broadcast to (batch, heads_q, seqlen_q, seqlen_k) = {full}, "
                             f"got shape {shape}")
        attn_bias = attn_bias.view((1,) * (4 - len(shape)) + shape) if len(shape) < 4 else attn_bias
    return Extras(p, ws, cap, alibi_slopes, attn_bias)


def _native(name: str) -> str:
    """The ``kernel`` argument of pyllm::attention_dropout_fwd for a kernel backend."""
    return "triton" if name == "triton" else "native"


def _ext_kernel(name: str):
    """The fused op with the features for a kernel backend (contract: csrc/pyllm.cpp, attention_ext_fwd)."""
    if name == "triton":
        return torch.ops.pyllm.triton_attention_ext_fwd
    return torch.ops.pyllm.attention_ext_fwd


def _dropout_rng(ext: Extras) -> Tensor | None:
    """The [seed, offset] tensor of a call with dropout (torch ops: traced by torch.compile), else None."""
    return reference.draw_dropout_rng() if ext.dropout_p > 0 else None


def _run_extras(q, k, v, causal, scale, key_padding_mask, return_lse, name, ext: Extras):
    """One (batch, seqlen, heads, head_dim) call with features."""
    rng = _dropout_rng(ext)
    if name == "reference":
        o, lse = reference.attention(q, k, v, causal=causal, softmax_scale=scale, key_padding_mask=key_padding_mask,
                                     dropout_p=ext.dropout_p, dropout_seed=None if rng is None else tuple(rng),
                                     window_size=ext.window_size, softcap=ext.softcap, alibi_slopes=ext.alibi_slopes,
                                     attn_bias=ext.attn_bias, return_lse=True)
        return (o, lse.detach()) if return_lse else o
    Lq, Lk = q.shape[1], k.shape[1]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    wl, wr = ext.window_size
    if rng is not None:  # the seed stays a tensor until the kernel runs (pyllm/ops/_autograd.py)
        o, lse = torch.ops.pyllm.attention_dropout_fwd(_native(name), q, k, v, key_padding_mask, None, None, causal,
                                                       scale, wl, wr, ext.softcap, ext.alibi_slopes, ext.attn_bias,
                                                       ext.dropout_p, rng, Lq, Lk)
    else:
        o, lse = _ext_kernel(name)(q, k, v, key_padding_mask, causal, scale, wl, wr, ext.softcap, ext.alibi_slopes,
                                   ext.attn_bias, 0.0, 0, 0, Lq, Lk)
    return (o, lse.detach()) if return_lse else o


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale) -> int:
    """Validate a packed call; returns the number of sequences."""
    fn = "attention_varlen"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(fn, name, t, ndim=3)
    _checks.same_dtype(fn, "q", q, k=k, v=v)
    _checks.same_device(fn, "q", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"{fn}: k/v have head_dim {k.shape[2]}/{v.shape[2]} but q has {q.shape[2]}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{fn}: v has (total, heads) {tuple(v.shape[:2])} but k has {tuple(k.shape[:2])}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{fn}: q's heads ({q.shape[1]}) must be a multiple of k's heads ({k.shape[1]}) (GQA/MQA)")
    _checks.scale(fn, "softmax_scale", softmax_scale)
    for name, mx in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(mx, bool) or not isinstance(mx, int) or mx < 0:
            raise ValueError(f"{fn}: {name} must be an int >= the longest sequence, got {mx!r}")
    for name, cu in (("q", cu_seqlens_q), ("k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            got = f"{_checks._dt(cu.dtype)} of shape {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise TypeError(f"{fn}: cu_seqlens_{name} must be a 1-D int32 tensor (batch + 1,), got {got}")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"{fn}: cu_seqlens_k has {cu_seqlens_k.shape[0]} entries but cu_seqlens_q has "
                         f"{cu_seqlens_q.shape[0]}")
    if torch.compiler.is_compiling():  # the offsets' values are data: the kernels check them when they run
        return cu_seqlens_q.shape[0] - 1
    for name, cu, total, mx in (("q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                ("k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        cname = f"cu_seqlens_{name}"
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{fn}: {cname} must start at 0, got {c[0]}")
        if any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"{fn}: {cname} must be non-decreasing, got {c}")
        if c[-1] != total:
            raise ValueError(f"{fn}: {cname} ends at {c[-1]} but {name} has {total} packed rows")
        longest = max((b - a for a, b in zip(c, c[1:])), default=0)
        if mx < longest:
            raise ValueError(f"{fn}: max_seqlen_{name} must be an int >= the longest sequence ({longest}), got {mx!r}")
    return cu_seqlens_q.shape[0] - 1


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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention over packed variable-length sequences (FlashAttention's ``flash_attn_varlen_func``).

    Args:
        q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim): sequences laid end to end,
            no padding. Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q against rows
            cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 cumulative offsets, starting at 0, ending at total.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence (they also key the dropout mask: a packed
            batch drops exactly what the padded batch (batch, max_seqlen, ...) drops).
        Other keywords as :func:`attention` (causal and window align bottom-right per sequence;
        alibi_slopes (heads_q,) or (batch, heads_q)).

    Returns:
        o (total_q, heads_q, head_dim) in q's dtype; with return_lse also lse (heads_q, total_q) float32.
    """
    nseq = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    ext = check_extras("attention_varlen", q, k, dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                       alibi_slopes=alibi_slopes, batch=nseq)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    name = backends.select("attention", _call(q, k, features=("varlen",) + ext.features()), backend)
    rng = _dropout_rng(ext)
    wl, wr = ext.window_size
    if name == "reference":
        o, lse = reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            causal=bool(causal), softmax_scale=scale, dropout_p=ext.dropout_p,
                                            dropout_seed=None if rng is None else tuple(rng), window_size=(wl, wr),
                                            softcap=ext.softcap, alibi_slopes=ext.alibi_slopes, return_lse=True)
    elif not _one_call_varlen(name, q.device):
        o, lse = _varlen_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal),
                                      scale, name, ext, rng)
    elif rng is not None:  # one fused call; the seed stays a tensor until the kernel runs
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = torch.ops.pyllm.attention_dropout_fwd(_native(name), q, k, v, None, cu_seqlens_q, cu_seqlens_k,
                                                       bool(causal), scale, wl, wr, ext.softcap, ext.alibi_slopes,
                                                       None, ext.dropout_p, rng, max_seqlen_q, max_seqlen_k)
    else:  # one fused call for the whole batch (contract: csrc/pyllm.cpp, attention_varlen_fwd)
        op = torch.ops.pyllm.triton_attention_varlen_fwd if name == "triton" else torch.ops.pyllm.attention_varlen_fwd
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale, wl, wr,
                    ext.softcap, ext.alibi_slopes, 0.0, 0, 0)
    return (o, lse.detach()) if return_lse else o


def _one_call_varlen(name: str, device: torch.device) -> bool:
    """Whether ``name`` runs a packed batch in one call: triton, and the C++ ops where pyllm._C registered an
    attention_varlen_fwd kernel for the device (the cpu kernels; not the cuda ones, nor an older build)."""
    return name == "triton" or backends._ext_has_kernel("attention_varlen", "CUDA" if device.type == "cuda" else "CPU")


def _varlen_per_sequence(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, name, ext: Extras, rng):
    """A packed batch as one attention_ext call per sequence, on views of the packed tensors (nothing padded or
    copied), each placed in the padded batch's dropout index space by shifting the offset by b Hq Lq Lk."""
    Hq, (wl, wr) = q.shape[1], ext.window_size
    cq, ck = cu_q.tolist(), cu_k.tolist()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    outs, lses = [], []
    for b in range(len(cq) - 1):
        nq, nk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if nq == 0:
            continue
        if nk == 0:  # a sequence without keys: zeros, lse = -inf
            outs.append(q.new_zeros((nq,) + tuple(q.shape[1:])))
            lses.append(torch.full((Hq, nq), -math.inf, device=q.device, dtype=torch.float32))
            continue
        slopes = ext.alibi_slopes
        slopes = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        qb, kb, vb = q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]]
        if rng is not None:
            rb = rng + torch.tensor([0, b * Hq * max_q * max_k])
            o, lse = torch.ops.pyllm.attention_dropout_fwd(_native(name), qb, kb, vb, None, None, None, causal, scale,
                                                           wl, wr, ext.softcap, slopes, None, ext.dropout_p, rb,
                                                           max_q, max_k)
        else:
            o, lse = _ext_kernel(name)(qb, kb, vb, None, causal, scale, wl, wr, ext.softcap, slopes, None, 0.0, 0, 0,
                                       max_q, max_k)
        outs.append(o[0])
        lses.append(lse[0])
    o = torch.cat(outs) if outs else q.new_zeros(q.shape)
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
) -> Tensor:
    """The exact attention maps of :func:`attention` (before dropout), for interpretation.

    q (batch, seqlen_q, heads_q, head_dim), k (batch, seqlen_k, heads_kv, head_dim) and the masking keywords
    of the attention call. ``lse`` (batch, heads_q, seqlen_q) from ``attention(..., return_lse=True)`` makes
    the maps exp(score - lse), exactly the probabilities the kernel used (no softmax pass; the result is then
    detached); ``heads`` (ints) limits them to those query heads. Computed one head at a time: memory is
    batch * seqlen_q * seqlen_k per head.

    Returns:
        (batch, len(heads) or heads_q, seqlen_q, seqlen_k) in q's dtype; rows that see no key are zeros.
    """
    fn = "attention_probs"
    _checks.tensor(fn, "k", k, ndim=4)
    _check(q, k, k, key_padding_mask, softmax_scale)
    ext = check_extras(fn, q, k, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                       attn_bias=attn_bias)
    B, Nq, Hq, _ = q.shape
    if heads is not None:
        heads = [heads] if isinstance(heads, int) else list(heads)
        bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < Hq]
        if bad:
            raise ValueError(f"{fn}: heads must be ints in [0, {Hq}), got {bad}")
    if lse is not None:
        if not isinstance(lse, Tensor) or tuple(lse.shape) != (B, Hq, Nq):
            got = tuple(lse.shape) if isinstance(lse, Tensor) else type(lse).__name__
            raise ValueError(f"{fn}: lse must have shape (batch, heads_q, seqlen_q) = {(B, Hq, Nq)}, got {got}")
        lse = lse.detach()
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    with torch.set_grad_enabled(torch.is_grad_enabled() and lse is None):
        return reference.attention_probs(q, k, causal=bool(causal), softmax_scale=scale,
                                         key_padding_mask=key_padding_mask, window_size=ext.window_size,
                                         softcap=ext.softcap, alibi_slopes=ext.alibi_slopes,
                                         attn_bias=ext.attn_bias, lse=lse, heads=heads)


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
    """Map an SDPA call onto pyllm.attention: (key_padding_mask, attn_bias, reasons it cannot be mapped).

    A bool mask of shape (B or 1, 1, 1, S) becomes the key-padding mask; any other bool mask becomes an
    additive bias of 0 / -inf and a float mask the bias itself (with its gradient); dropout maps onto the
    kernels' dropout.
    """
    reasons = []
    if dropout_p >= 1.0:
        reasons.append("dropout_p = 1 is served by the reference")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        reasons.append("only 4-D (batch, heads, L, E) inputs map onto the kernels")
    elif not (query.shape[0] == key.shape[0] == value.shape[0]):
        reasons.append("broadcast batch dims are served by the reference")
    if value.shape[-1] != query.shape[-1]:
        reasons.append("value's embedding dim differs from query's")
    if is_causal and query.shape[-2] != key.shape[-2]:
        reasons.append("top-left causal with L != S is served by the reference (kernels align bottom-right)")
    kpm = bias = None
    if attn_mask is not None and not reasons:
        m = attn_mask
        full = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        if m.dim() > 4 or any(s not in (1, f) for s, f in zip(m.shape[::-1], full[::-1])):
            reasons.append(f"attn_mask of shape {tuple(m.shape)} does not broadcast to {full}")
        elif m.dtype == torch.bool and all(s == 1 for s in m.shape[-3:-1]) and m.shape[-1] == key.shape[-2]:
            m = m.reshape((-1,) + tuple(m.shape[-1:])) if m.dim() >= 2 else m[None]
            kpm = m.expand(query.shape[0], key.shape[-2]).contiguous()
        else:  # a 4-D view (batch or 1, heads or 1, L or 1, S or 1) of the additive bias
            bias = m if m.dtype != torch.bool else torch.zeros(m.shape, dtype=query.dtype, device=m.device).masked_fill(
                ~m, float("-inf"))
            bias = bias.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    return kpm, bias, reasons


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
    added. 4-D calls (causal only with L == S) map onto pyllm.attention: a key-padding bool mask
    (B or 1, 1, 1, S) as key_padding_mask, any other mask as attn_bias (bool: 0 / -inf), dropout as its
    Philox dropout; a backend whose kernels lack a needed feature declines and the next one serves.
    Everything else runs on the reference path -- never a wrong answer. Rows that see no key give zeros
    rather than torch's NaN.
    """
    _sdpa_check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    kpm, bias, reasons = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal)
    ext = Extras(dropout_p=float(dropout_p) if not reasons else 0.0, attn_bias=bias)
    name = backends.select("attention", _call(query, key, reasons, ext.features()), backend)
    if reasons:
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, upcast=True
        )
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, H, E) views, no copies
    o = _run(q, k, v, bool(is_causal), scale, kpm, False, name, ext)
    return o.transpose(1, 2)


def _describe_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, **_):
    _sdpa_check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _, bias, reasons = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal)
    ext = Extras(dropout_p=float(dropout_p) if not reasons else 0.0, attn_bias=bias)
    return "attention", _call(query, key, reasons, ext.features())


backends.register_op("attention", _describe_attention)
backends.register_op("scaled_dot_product_attention", _describe_sdpa)
