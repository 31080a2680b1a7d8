"""FlashAttention-2 in Triton: forward and backward launchers for the pyllm attention op.

Math, per (batch b, query head h), with kv head g = h // (Hq // Hkv) and scale c:

    S = c * Q K_g^T                         (Nq, Nk), masked entries -inf
    lse_i = log sum_j exp(S_ij)             natural log, -inf for a row that sees no key
    P = exp(S - lse)                        never stored: recomputed in the backward from lse
    O = P V_g
    backward, with delta_i = sum_d dO_id O_id:
    dV_g += P^T dO      dS = P * (dO V_g^T - delta)      dQ = c dS K_g      dK_g += c dS^T Q

Causal masking is bottom-right aligned (query i sees key j iff j <= i + Nk - Nq), as in
FlashAttention 2.1+:

    Nq = 2, Nk = 5         Nq = 5, Nk = 2
      k 0 1 2 3 4            k 0 1
    q0  x x x x .          q0  . .      <- sees no key: out 0, lse -inf, zero gradients
    q1  x x x x x          q1  . .
                           q2  . .
                           q3  x .
                           q4  x x

Kernels
  _attn_fwd        one program per (query block, batch * query head); streams key blocks with an
                   online softmax (running max and sum in fp32, exp2 with log2(e) folded into the
                   scale), rescales once at the end, stores lse. Key blocks a causal tile cannot see
                   are never visited; blocks fully below the diagonal skip the mask arithmetic.
  _attn_bwd_pre    delta = rowsum(dO * O) in fp32.
  _attn_bwd_dkdv   one program per (key block, batch * kv head); loops over the query heads of the
                   GQA group and over the query blocks that see the key block; writes dK, dV once.
  _attn_bwd_dq     one program per (query block, batch * query head); writes dQ once.
  No atomics anywhere, so the gradients are bitwise reproducible whatever `deterministic` says.
  (Unlike the Triton tutorial 06 backward, which is causal-only, every kernel here handles causal
  and non-causal masks the same way: triton issues 4541, 5660.)

FlashAttention's features (attention_ext_fwd / attention_ext_bwd; constexpr flags, so the plain launch
compiles to the code without them): WINDOW (key blocks outside the window are never visited: O(N w)),
SOFTCAP (s = cap * tanh(s / cap), gradient through 1 - tanh^2), HAS_ALIBI (-slope * |i + Nk - Nq - j|),
HAS_BIAS (read through broadcast strides; BIAS_GRAD stores dS into a (B, Hq, Nq, Nk) fp32 buffer from the
dQ kernel, which visits each element once), DROPOUT (tl.randint = Philox4x32-10 on the element index,
the mask pyllm.reference.dropout_mask and the C++ kernel draw). Score order: scale * q.k, softcap,
+ ALiBi + bias, masks, softmax, dropout; the backward uses dV += (P Z)^T dO and dS = P * (Z dP - delta).

VARLEN (attention_varlen_fwd / attention_varlen_bwd): one launch for a packed batch. The grid covers the
longest sequence: program (block, sequence * head) loads its sequence's first rows and lengths from
cu_seqlens_q/k and returns at once when its block lies past them; lse and delta are (Hq, total_q).

Head dims up to 256 are padded to BLOCK_D = next_power_of_2(D) (at least 16) with masked loads.

On CPU tensors the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported). Two interpreter numerics differ from a GPU (triton 3.9): `tl.dot` on bf16 operands
is wrong, and fp32 -> bf16 casts truncate instead of rounding to nearest even. The launchers set
the INTERPRET flag on CPU tensors, and the kernels then cast dot operands to fp32 (exact) and
round to bf16 by hand, so the interpreter computes what a GPU computes up to summation order.
The interpreter also uses one small fixed tile config instead of autotuning (which would time
the interpreter).
"""

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from pyllm.capabilities import TRITON
from pyllm.kernels import interpreting

__all__ = ["attention_fwd", "attention_bwd", "attention_ext_fwd", "attention_ext_bwd", "attention_varlen_fwd",
           "attention_varlen_bwd"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = TRITON.max_head_dim
_DTYPES = tuple(getattr(torch, d) for d in TRITON.dtypes)
# Fixed tiles under the interpreter: per-op overhead dominates there, so fewer, larger tiles win
# (64 runs seqlen 113 about 2-4x faster than 32). Tests may set 16 to cover many-block paths cheaply.
_INTERPRET_BLOCK_M = 64
_INTERPRET_BLOCK_N = 64


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    # (M, K) @ (K, N) -> (M, N) fp32. The interpreter's bf16 dot is wrong; fp32 of the same values is not.
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # fp32 -> dtype, rounding to nearest even as the GPU does. The interpreter truncates fp32 -> bf16,
    # which biases every rounded P, dS and output; there we round the bits by hand first.
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _feature_scores(qk, qi, kj, Nq, Nk, shift, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn,
                    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Scores with softcap, ALiBi and bias from the raw product q.k, in the log2 domain, and
    t = tanh(scale q.k / softcap) for the gradient. qi, kj: query and key indices, broadcastable to qk."""
    s = qk * sm_nat
    t = s
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.math.exp(2.0 * s / softcap) + 1.0)  # tanh; saturates to +-1 without NaN
        s = softcap * t
    if HAS_ALIBI:
        s = s - slope * tl.abs(qi + shift - kj).to(tl.float32)
    if HAS_BIAS:
        s = s + tl.load(bias_base + qi * stride_bm + kj * stride_bn, mask=(qi < Nq) & (kj < Nk), other=0.0)
    return s * 1.4426950408889634, t


@triton.jit
def _in_window(qi, kj, shift, win_left, win_right):
    # bottom-right aligned: qi + shift - win_left <= kj <= qi + shift + win_right (-1 = unbounded)
    return ((win_right < 0) | (kj <= qi + shift + win_right)) & ((win_left < 0) | (kj >= qi + shift - win_left))


@triton.jit
def _dropout_scale(seed, drop_offset, row0, qi, kj, drop_lk, drop_thr, drop_scale):
    # keep / (1 - p) for element index ((b Hq + h) Lq + i) Lk + j; row0 = (b Hq + h) Lq (int64)
    bits = tl.randint(seed, drop_offset + (row0 + qi) * drop_lk + kj).to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits >= drop_thr, drop_scale, 0.0)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_d,
              Nk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
              Nq, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
              seed, drop_offset, row0, drop_lk, drop_thr, drop_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
              DROPOUT: tl.constexpr):
    """One key block of the online softmax. MASKED: the tile crosses the causal diagonal, the window or Nk."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    ld_mask = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=ld_mask, other=0.0)  # (N, D)
    if SOFTCAP or HAS_ALIBI or HAS_BIAS:
        s, _t = _feature_scores(_dot(q, tl.trans(k), INTERPRET, PRECISION), offs_m[:, None], offs_n[None, :], Nq,
                                Nk, shift, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn,
                                SOFTCAP, HAS_ALIBI, HAS_BIAS)
    else:
        s = _dot(q, tl.trans(k), INTERPRET, PRECISION) * qk_scale  # (M, N), log2 domain
    if MASKED:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
        if WINDOW:
            ok = ok & _in_window(offs_m[:, None], offs_n[None, :], shift, win_left, win_right)
        s = tl.where(ok, s, float("-inf"))
    if HAS_MASK:
        keep = tl.load(mask_base + offs_n * stride_mn, mask=n_ok, other=0) != 0  # (N,)
        s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; subtract 0 there instead (-inf - -inf = nan).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])  # (M, N)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:  # after the row sums: lse is the undropped softmax's
        p = p * _dropout_scale(seed, drop_offset, row0, offs_m[:, None], offs_n[None, :], drop_lk, drop_thr,
                               drop_scale)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=ld_mask, other=0.0)  # (N, D)
    acc = acc * alpha[:, None] + _dot(_to(p, v.dtype, INTERPRET), v, INTERPRET, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Out, Lse,  # pointers; Mask is uint8 (B, Nk) or a dummy when not HAS_MASK
    stride_qb, stride_qn, stride_qh,  # q strides (the last dim has stride 1)
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_mb, stride_mn,
    stride_ob, stride_on, stride_oh,
    Hq, Nq, Nk, GROUP,  # GROUP = Hq // Hkv
    qk_scale,  # softmax_scale * log2(e)
    Alibi, Bias, DBias,  # feature pointers (dummies when off): alibi (B or 1, Hq) fp32, bias/dbias fp32
    stride_ab, stride_bb, stride_bh, stride_bm, stride_bn,
    win_left, win_right, softcap, sm_nat, drop_thr, drop_scale, seed, drop_offset, drop_lq, drop_lk,
    TUNE_NQ, TUNE_NK,  # bucketed seqlens: autotune keys only
    CuQ, CuK,  # packed sequences (VARLEN): cu_seqlens_q/k int32 (B + 1,); dummies otherwise
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # int64: batch offsets overflow int32 on large inputs
    h = (pid_bh % Hq).to(tl.int64)
    g = h // GROUP
    start_m = pid_m * BLOCK_M
    row_base = pid_bh.to(tl.int64) * Nq  # lse (B, Hq, Nq)
    q_start = b * 0
    k_start = b * 0
    if VARLEN:  # sequence b of a packed batch: rows from cu_seqlens; Nq is total_q, lse is (Hq, total_q)
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        row_base = h * Nq + q_start
        Nq = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        Nk = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
        if start_m >= Nq:  # the grid covers the longest sequence
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM

    q_base = Q + b * stride_qb + q_start * stride_qn + h * stride_qh
    k_base = K + b * stride_kb + k_start * stride_kn + g * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + g * stride_vh
    mask_base = Mask + b * stride_mb
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    slope = tl.load(Alibi + b * stride_ab + h) if HAS_ALIBI else 0.0
    bias_base = Bias + b * stride_bb + h * stride_bh
    row0 = (b * Hq + h) * drop_lq

    # Key blocks [0, n_full) are seen whole by every row of the tile; [n_full, hi) need the mask.
    shift = Nk - Nq
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Nk)
        n_full = tl.minimum(tl.maximum(start_m + shift + 1, 0), Nk) // BLOCK_N * BLOCK_N
    else:
        hi = Nk
        n_full = Nk // BLOCK_N * BLOCK_N
    lo = start_m * 0
    if WINDOW:  # only the key blocks the window reaches, all masked (win_right is 0 under causal)
        hi = hi + lo  # a tensor whatever integer specialization made of it
        if win_left >= 0:
            lo = tl.maximum(start_m + shift - win_left, 0) // BLOCK_N * BLOCK_N
        if win_right >= 0:
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift + win_right, 0), Nk)
        n_full = lo
    for start_n in range(lo, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_d,
                                  Nk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
                                  Nq, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
                                  seed, drop_offset, row0, drop_lk, drop_thr, drop_scale,
                                  HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_MASK, INTERPRET, PRECISION,
                                  WINDOW, SOFTCAP, HAS_ALIBI, HAS_BIAS, DROPOUT)
    for start_n in range(n_full, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_d,
                                  Nk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
                                  Nq, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
                                  seed, drop_offset, row0, drop_lk, drop_thr, drop_scale,
                                  HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_MASK, INTERPRET, PRECISION,
                                  WINDOW, SOFTCAP, HAS_ALIBI, HAS_BIAS, DROPOUT)

    # Rows that saw no key have l = 0 and acc = 0: out 0, lse -inf.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_base = Out + b * stride_ob + q_start * stride_on + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], _to(out, Out.dtype.element_ty, INTERPRET),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + row_base + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_pre(
    Out, DO, Delta,
    stride_ob, stride_on, stride_oh,
    stride_db, stride_dn, stride_dh,
    Hq, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta (B, Hq, Nq) fp32 = rowsum(dO * O)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _load_row_stats(Lse, Delta, row_base, offs_m, Nq):
    # lse in log2 units with +inf for rows past Nq and rows that see no key, so exp2(s - lse) = 0.
    m_ok = offs_m < Nq
    lse = tl.load(Lse + row_base + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, row_base, Lse, Delta, start_m, offs_n, offs_d,
               Nq, shift, qk_scale, stride_qn, stride_don,
               Nk, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
               seed, drop_offset, row0, drop_lk, drop_thr, drop_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
               INTERPRET: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
               DROPOUT: tl.constexpr):
    """One query block against the program's key block, in the transposed (N, M) orientation."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    ld_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=ld_mask, other=0.0)  # (M, D)
    do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=ld_mask, other=0.0)  # (M, D)
    lse2, delta = _load_row_stats(Lse, Delta, row_base, offs_m, Nq)
    if SOFTCAP or HAS_ALIBI or HAS_BIAS:
        s_t, t_t = _feature_scores(_dot(k, tl.trans(q), INTERPRET, PRECISION), offs_m[None, :], offs_n[:, None], Nq,
                                   Nk, shift, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn,
                                   SOFTCAP, HAS_ALIBI, HAS_BIAS)
    else:
        s_t = _dot(k, tl.trans(q), INTERPRET, PRECISION) * qk_scale  # (N, M), log2 domain
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASKED:  # causal diagonal / window; padded keys are zeroed once at the end of the program
        if CAUSAL:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, p_t, 0.0)
        if WINDOW:
            p_t = tl.where(_in_window(offs_m[None, :], offs_n[:, None], shift, win_left, win_right), p_t, 0.0)
    dp_t = _dot(v, tl.trans(do), INTERPRET, PRECISION)  # (N, M)
    if DROPOUT:
        z_t = _dropout_scale(seed, drop_offset, row0, offs_m[None, :], offs_n[:, None], drop_lk, drop_thr, drop_scale)
        dv += _dot(_to(p_t * z_t, do.dtype, INTERPRET), do, INTERPRET, PRECISION)
        dp_t = dp_t * z_t
    else:
        dv += _dot(_to(p_t, do.dtype, INTERPRET), do, INTERPRET, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk += _dot(_to(ds_t, q.dtype, INTERPRET), q, INTERPRET, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Mask, DK, DV,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_mb, stride_mn,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    Hq, Hkv, Nq, Nk, GROUP,
    qk_scale, sm_scale,
    Alibi, Bias, DBias,  # feature pointers (dummies when off): alibi (B or 1, Hq) fp32, bias/dbias fp32
    stride_ab, stride_bb, stride_bh, stride_bm, stride_bn,
    win_left, win_right, softcap, sm_nat, drop_thr, drop_scale, seed, drop_offset, drop_lq, drop_lk,
    TUNE_NQ, TUNE_NK,
    CuQ, CuK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // Hkv).to(tl.int64)
    g = (pid_bkv % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    total_q = Nq
    q_start = b * 0
    k_start = b * 0
    if VARLEN:  # as in the forward; lse and delta are (Hq, total_q)
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        Nq = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        Nk = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
        if start_n >= Nk:
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + k_start * stride_kn + g * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (N, D)
    v = tl.load(V + b * stride_vb + k_start * stride_vn + g * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (N, D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)

    # Query blocks [lo, m_full) cross the causal diagonal; [m_full, Nq) see the whole key block.
    shift = Nk - Nq
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        m_full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, Nq)
        m_full = tl.maximum(m_full, lo)
    else:
        lo = 0
        m_full = 0
    hi = Nq
    if WINDOW:  # only the query blocks that reach this key block, all masked (win_right is 0 under causal)
        lo = lo + start_n * 0  # tensors whatever integer specialization made of them
        hi = hi + start_n * 0
        if win_right >= 0:
            lo = tl.maximum(start_n - shift - win_right, 0) // BLOCK_M * BLOCK_M
        if win_left >= 0:
            hi = tl.minimum(tl.maximum(start_n + BLOCK_N - shift + win_left, 0), Nq)
        m_full = hi
    # Each key block reads every query head of its GQA group: dK, dV summed in registers, in order.
    for i in range(0, GROUP):
        h = g * GROUP + i
        q_base = Q + b * stride_qb + q_start * stride_qn + h * stride_qh
        do_base = DO + b * stride_dob + q_start * stride_don + h * stride_doh
        if VARLEN:
            row_base = h * total_q + q_start
        else:
            row_base = (b * Hq + h) * Nq
        slope = tl.load(Alibi + b * stride_ab + h) if HAS_ALIBI else 0.0
        bias_base = Bias + b * stride_bb + h * stride_bh
        row0 = (b * Hq + h) * drop_lq
        for start_m in range(lo, m_full, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, row_base, Lse, Delta, start_m, offs_n, offs_d,
                                Nq, shift, qk_scale, stride_qn, stride_don,
                                Nk, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
                                seed, drop_offset, row0, drop_lk, drop_thr, drop_scale,
                                HEAD_DIM, BLOCK_M, True, INTERPRET, PRECISION, CAUSAL,
                                WINDOW, SOFTCAP, HAS_ALIBI, HAS_BIAS, DROPOUT)
        for start_m in range(m_full, hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, row_base, Lse, Delta, start_m, offs_n, offs_d,
                                Nq, shift, qk_scale, stride_qn, stride_don,
                                Nk, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
                                seed, drop_offset, row0, drop_lk, drop_thr, drop_scale,
                                HEAD_DIM, BLOCK_M, False, INTERPRET, PRECISION, CAUSAL,
                                WINDOW, SOFTCAP, HAS_ALIBI, HAS_BIAS, DROPOUT)

    dk = dk * sm_scale
    if HAS_MASK:  # a padded key gets no probability, so its dK and dV are 0 (columns are independent)
        keep = tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=offs_n < Nk, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    tl.store(DK + b * stride_dkb + (k_start + offs_n[:, None]) * stride_dkn + g * stride_dkh + offs_d[None, :],
             _to(dk, DK.dtype.element_ty, INTERPRET), mask=kv_mask)
    tl.store(DV + b * stride_dvb + (k_start + offs_n[:, None]) * stride_dvn + g * stride_dvh + offs_d[None, :],
             _to(dv, DV.dtype.element_ty, INTERPRET), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_d,
             Nk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
             Nq, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
             seed, drop_offset, row0, drop_lk, drop_thr, drop_scale, dbias_base,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
             INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
             WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
             DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    ld_mask = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=ld_mask, other=0.0)  # (N, D)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=ld_mask, other=0.0)  # (N, D)
    if SOFTCAP or HAS_ALIBI or HAS_BIAS:
        s, t = _feature_scores(_dot(q, tl.trans(k), INTERPRET, PRECISION), offs_m[:, None], offs_n[None, :], Nq,
                               Nk, shift, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn,
                               SOFTCAP, HAS_ALIBI, HAS_BIAS)
    else:
        s = _dot(q, tl.trans(k), INTERPRET, PRECISION) * qk_scale  # (M, N), log2 domain
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
        if WINDOW:
            ok = ok & _in_window(offs_m[:, None], offs_n[None, :], shift, win_left, win_right)
        p = tl.where(ok, p, 0.0)
    if HAS_MASK:
        keep = tl.load(mask_base + offs_n * stride_mn, mask=n_ok, other=0) != 0
        p = tl.where(keep[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), INTERPRET, PRECISION)  # (M, N)
    if DROPOUT:
        dp = dp * _dropout_scale(seed, drop_offset, row0, offs_m[:, None], offs_n[None, :], drop_lk, drop_thr,
                                 drop_scale)
    ds = p * (dp - delta[:, None])
    if BIAS_GRAD:  # the bias enters the score unscaled: dbias = dS; this program owns these elements
        tl.store(dbias_base + offs_m[:, None] * Nk + offs_n[None, :], ds,
                 mask=(offs_m[:, None] < Nq) & n_ok[None, :])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += _dot(_to(ds, k.dtype, INTERPRET), k, INTERPRET, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, Mask, DQ,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_mb, stride_mn,
    stride_dqb, stride_dqn, stride_dqh,
    Hq, Nq, Nk, GROUP,
    qk_scale, sm_scale,
    Alibi, Bias, DBias,  # feature pointers (dummies when off): alibi (B or 1, Hq) fp32, bias/dbias fp32
    stride_ab, stride_bb, stride_bh, stride_bm, stride_bn,
    win_left, win_right, softcap, sm_nat, drop_thr, drop_scale, seed, drop_offset, drop_lq, drop_lk,
    TUNE_NQ, TUNE_NK,
    CuQ, CuK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    g = h // GROUP
    start_m = pid_m * BLOCK_M
    row_base = pid_bh.to(tl.int64) * Nq
    q_start = b * 0
    k_start = b * 0
    if VARLEN:  # as in the forward
        q_start = tl.load(CuQ + b).to(tl.int64)
        k_start = tl.load(CuK + b).to(tl.int64)
        row_base = h * Nq + q_start
        Nq = (tl.load(CuQ + b + 1) - q_start).to(tl.int32)
        Nk = (tl.load(CuK + b + 1) - k_start).to(tl.int32)
        if start_m >= Nq:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ld_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + (q_start + offs_m[:, None]) * stride_qn + h * stride_qh + offs_d[None, :],
                mask=ld_mask, other=0.0)  # (M, D)
    do = tl.load(DO + b * stride_dob + (q_start + offs_m[:, None]) * stride_don + h * stride_doh + offs_d[None, :],
                 mask=ld_mask, other=0.0)  # (M, D)
    lse2, delta = _load_row_stats(Lse, Delta, row_base, offs_m, Nq)
    k_base = K + b * stride_kb + k_start * stride_kn + g * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vn + g * stride_vh
    mask_base = Mask + b * stride_mb
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    slope = tl.load(Alibi + b * stride_ab + h) if HAS_ALIBI else 0.0
    bias_base = Bias + b * stride_bb + h * stride_bh
    row0 = (b * Hq + h) * drop_lq
    dbias_base = DBias + pid_bh.to(tl.int64) * Nq * Nk

    shift = Nk - Nq
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Nk)
        n_full = tl.minimum(tl.maximum(start_m + shift + 1, 0), Nk) // BLOCK_N * BLOCK_N
    else:
        hi = Nk
        n_full = Nk // BLOCK_N * BLOCK_N
    lo = start_m * 0
    if WINDOW:  # as in the forward
        hi = hi + lo
        if win_left >= 0:
            lo = tl.maximum(start_m + shift - win_left, 0) // BLOCK_N * BLOCK_N
        if win_right >= 0:
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift + win_right, 0), Nk)
        n_full = lo
    for start_n in range(lo, n_full, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_d,
                      Nk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
                      Nq, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
                      seed, drop_offset, row0, drop_lk, drop_thr, drop_scale, dbias_base,
                      HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_MASK, INTERPRET, PRECISION,
                      WINDOW, SOFTCAP, HAS_ALIBI, HAS_BIAS, DROPOUT, BIAS_GRAD)
    for start_n in range(n_full, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, offs_m, offs_d,
                      Nk, shift, qk_scale, stride_kn, stride_vn, stride_mn,
                      Nq, sm_nat, softcap, slope, bias_base, stride_bm, stride_bn, win_left, win_right,
                      seed, drop_offset, row0, drop_lk, drop_thr, drop_scale, dbias_base,
                      HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_MASK, INTERPRET, PRECISION,
                      WINDOW, SOFTCAP, HAS_ALIBI, HAS_BIAS, DROPOUT, BIAS_GRAD)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + (q_start + offs_m[:, None]) * stride_dqn + h * stride_dqh + offs_d[None, :],
             _to(dq, DQ.dtype.element_ty, INTERPRET), mask=ld_mask)


# ----------------------------------------------------------------------------------------------
# Autotuning (GPU only)
# ----------------------------------------------------------------------------------------------

# Meant for sm_80 / sm_90; keyed on bucketed seqlens, head dim, flags (and dtypes, which the
# autotuner adds itself), so a growing KV cache does not re-tune at every decoding step.
# PYLLM_TRITON_AUTOTUNE=0 launches the one heuristic config instead (each new shape then compiles
# one kernel rather than timing all of them: quick GPU checks).
_AUTOTUNE = os.environ.get("PYLLM_TRITON_AUTOTUNE", "1") != "0"
_TUNE_KEY = ["TUNE_NQ", "TUNE_NK", "HEAD_DIM", "CAUSAL", "HAS_MASK", "WINDOW", "SOFTCAP", "HAS_ALIBI", "HAS_BIAS",
             "DROPOUT", "VARLEN"]
_CONFIGS_SM80 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
        (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (128, 32, 4, 4),
    ]
]
# Hopper (sm_90): tl.dot becomes wgmma when every warpgroup (4 warps) owns a multiple of 64 query rows, so
# BLOCK_M is 64 or 128 on 4 warps, 128 on 8; BLOCK_N 64-128 with 3-4 stages, which its 227 KB of shared
# memory holds. _prune keeps the list of the GPU at hand.
_CONFIGS_SM90 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
        (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
    ]
]
_CONFIGS = _CONFIGS_SM80 + _CONFIGS_SM90
_SM90_IDS = {id(c) for c in _CONFIGS_SM90}


def _hopper(t) -> bool:
    return t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] == 9


def _heuristic(dtype, block_d, tune_nq, hopper=False):
    """One good-enough config, used for fp32, without autotuning, and as the pruning fallback."""
    if hopper and dtype != torch.float32 and block_d <= 128:
        bm, bn, w, s = (128, 128, 8, 3) if block_d <= 64 else (128, 64, 8, 3)
    elif dtype == torch.float32:
        # fp32 dots run on CUDA cores with fp32 tiles in shared memory (and compile slowly): keep them small.
        bm, bn, w, s = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
                        128: (64, 32, 4, 2)}.get(block_d, (32, 32, 4, 1))
    elif block_d <= 64:
        bm, bn, w, s = 128, 64, 4, 3
    elif block_d <= 128:
        bm, bn, w, s = 128, 64, 8, 3
    else:
        bm, bn, w, s = 64, 64, 4, 2
    if tune_nq <= 64:  # decoding / short queries: a 128-row tile would be mostly padding
        bm = min(bm, 64)
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _prune(configs, named_args, **kwargs):
    # Large tiles of D >= 128 overflow shared memory or spill; short query sides waste 128-row
    # tiles; fp32 gets its one small config (every fp32 config takes minutes to compile).
    args = {**named_args, **kwargs}
    dtype, block_d, tune_nq = args["Q"].dtype, args["BLOCK_D"], args["TUNE_NQ"]
    hopper = _hopper(args["Q"])
    if dtype == torch.float32:
        return [_heuristic(dtype, block_d, tune_nq)]
    configs = [c for c in configs if (id(c) in _SM90_IDS) == hopper] or configs  # this GPU's own list
    keep = [c for c in configs
            if (block_d < 256 or max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64)
            and (block_d < 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64)
            and (tune_nq > 64 or c.kwargs["BLOCK_M"] == 64)]
    return keep or [_heuristic(dtype, block_d, tune_nq, hopper)]


def _tuned(kernel):
    return triton.autotune(configs=_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)


_attn_fwd_tuned = _tuned(_attn_fwd)
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _bucket(n):
    # Seqlen bucket for the autotune key: powers of two, capped (tiling choices stop changing).
    return min(triton.next_power_of_2(max(n, 1)), 8192)


def _last_dim_contiguous(x):
    # Kernels take any strides but a unit stride on head_dim; only odd views (expanded gradients) copy.
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, v, key_padding_mask, fn):
    # Cheap guards against calls that would read out of bounds; pyllm.attention validates every argument
    # with a precise message before it gets here, so these only stop direct calls of the raw op.
    B, _, Hq, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    mask_ok = key_padding_mask is None or (key_padding_mask.dtype == torch.bool and key_padding_mask.device == q.device
                                           and tuple(key_padding_mask.shape) == (B, k.shape[1]))
    if not (q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and k.shape[0] == B and k.shape[3] == D
            and k.shape[2] > 0 and Hq % k.shape[2] == 0 and 1 <= D <= _MAX_HEAD_DIM and q.dtype in _DTYPES
            and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device and mask_ok):
        raise ValueError(f"{fn}: inputs the kernel cannot take: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, key_padding_mask "
                         f"{None if key_padding_mask is None else tuple(key_padding_mask.shape)} "
                         "(call pyllm.attention for a precise error)")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        raise ValueError(f"{fn}: q must be on a CUDA device (or the CPU under TRITON_INTERPRET=1); got {q.device}")


def _launch_args(q, key_padding_mask):
    """Shared launch arguments: (mask tensor, mask strides, constexprs, launch config or None to autotune)."""
    D = q.shape[3]
    on_cpu = q.device.type == "cpu"
    if key_padding_mask is None:
        mask, mask_strides = q, (0, 0)  # dummy pointer, never read
    else:
        mask = key_padding_mask.view(torch.uint8)  # same bytes; triton loads bools awkwardly
        mask_strides = (mask.stride(0), mask.stride(1))
    consts = dict(
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_MASK=key_padding_mask is not None,
        INTERPRET=on_cpu,
        # fp32 inputs get true fp32 products (TF32 would miss the fp32-vs-fp64 error bound)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if on_cpu:
        fixed = dict(BLOCK_M=_INTERPRET_BLOCK_M, BLOCK_N=_INTERPRET_BLOCK_N)
    elif not _AUTOTUNE:
        c = _heuristic(q.dtype, consts["BLOCK_D"], _bucket(q.shape[1]), _hopper(q))
        fixed = dict(**c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        fixed = None  # autotune
    return mask, mask_strides, consts, fixed


def _feature_args(q, k, causal, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                  attn_bias=None, dropout_p=0.0, seed=0, offset=0, drop_lq=0, drop_lk=0, dbias=None, batch=None):
    """(runtime arguments, constexprs) of the feature block the three kernels share (contract: csrc/pyllm.cpp);
    ``batch``: the number of sequences of a packed call (q is then (1, total_q, Hq, D))."""
    B, Nq, Hq, _ = q.shape
    B = B if batch is None else batch
    Nk = k.shape[1]
    right = 0 if causal else window_right
    alibi, stride_ab = q, 0  # dummy pointers when a feature is off: never read
    if alibi_slopes is not None:  # memory-safety guard only (the op layer validated the call)
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"attention: alibi_slopes must be ({Hq},) or ({B}, {Hq}); got {tuple(alibi_slopes.shape)}")
        alibi = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
        stride_ab = Hq if alibi.dim() == 2 else 0
    bias, bias_strides = q, (0, 0, 0, 0)
    if attn_bias is not None:  # fp32, broadcast through zero strides: never materialized
        bias = attn_bias.to(torch.float32).expand(B, Hq, Nq, Nk)
        bias_strides = bias.stride()
    thr = min(int(dropout_p * 4294967296.0), 0xFFFFFFFF) if dropout_p > 0 else 0
    args = (alibi, bias, q if dbias is None else dbias, stride_ab, *bias_strides,
            window_left, right, float(softcap), float(softmax_scale), thr, 1.0 / (1.0 - dropout_p), int(seed),
            int(offset), int(drop_lq), int(drop_lk))
    consts = dict(WINDOW=window_left >= 0 or (right >= 0 and not causal), SOFTCAP=softcap > 0,
                  HAS_ALIBI=alibi_slopes is not None, HAS_BIAS=attn_bias is not None, DROPOUT=dropout_p > 0,
                  BIAS_GRAD=dbias is not None)
    return args, consts


def _packed(varlen, q):
    """Launch geometry of a packed call (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) or None:
    (cu_q, cu_k pointers, batch for the grid, grid Nq, grid Nk, VARLEN). Packed tensors are (1, total, H, D)
    views here, read with a zero batch stride from each sequence's first row."""
    if varlen is None:
        return q, q, None, None, None, False
    cu_q, cu_k, max_q, max_k = varlen
    return cu_q, cu_k, cu_q.numel() - 1, max_q, max_k, True


def _strides(x, packed):
    s = x.stride()[:3]
    return (0,) + tuple(s[1:]) if packed else s


def attention_fwd(q, k, v, key_padding_mask, causal: bool, softmax_scale: float, features: dict | None = None,
                  varlen=None):
    """FlashAttention-2 forward.

    q (B, Nq, Hq, D); k, v (B, Nk, Hkv, D), Hq % Hkv == 0; any strides with stride(-1) == 1;
    key_padding_mask (B, Nk) bool (True = real token) or None; causal is bottom-right aligned.
    Returns out (B, Nq, Hq, D) contiguous in q.dtype and lse (B, Hq, Nq) float32 (natural log;
    -inf, with out = 0, for a row that sees no key). ``features``: keywords of :func:`_feature_args`.
    ``varlen`` = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k): q, k, v are packed (1, total, H, D)
    views, one program per (query block, sequence * head); lse is then (1, Hq, total_q).
    """
    _check(q, k, v, key_padding_mask, "attention_fwd")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    cu_q, cu_k, nseq, grid_q, grid_k, packed = _packed(varlen, q)
    out = torch.zeros((B, Nq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Nk == 0:
        return out, lse  # nothing to attend to: zeros and -inf, as the kernel would write
    mask, mask_strides, consts, fixed = _launch_args(q, key_padding_mask)
    feat, feat_consts = _feature_args(q, k, causal, softmax_scale, **(features or {}), batch=nseq)
    consts.update(feat_consts, VARLEN=packed)
    B, grid_q, grid_k = (nseq, grid_q, grid_k) if packed else (B, Nq, Nk)
    args = (q, k, v, mask, out, lse,
            *_strides(q, packed), *_strides(k, packed), *_strides(v, packed), *mask_strides, *_strides(out, packed),
            Hq, Nq, Nk, Hq // Hkv, softmax_scale * _LOG2E, *feat, _bucket(grid_q), _bucket(grid_k), cu_q, cu_k)
    grid = lambda meta: (triton.cdiv(grid_q, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        if fixed is None:
            _attn_fwd_tuned[grid](*args, CAUSAL=bool(causal), **consts)
        else:
            _attn_fwd[grid](*args, CAUSAL=bool(causal), **consts, **fixed)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_padding_mask, causal: bool, softmax_scale: float,
                  deterministic: bool, features: dict | None = None, varlen=None):
    """FlashAttention-2 backward.

    dout, out (B, Nq, Hq, D); q, k, v and key_padding_mask as in attention_fwd; lse (B, Hq, Nq)
    float32 from attention_fwd. Returns dq, dk, dv, contiguous, shaped and typed like q, k, v.
    Rows with lse = -inf contribute nothing. No atomics are used, so the result is bitwise
    reproducible for any `deterministic`. ``varlen`` as in :func:`attention_fwd` (lse (1, Hq, total_q)).
    """
    _check(q, k, v, key_padding_mask, "attention_bwd")
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"attention_bwd: dout and out must have q's shape {tuple(q.shape)}; "
                         f"got {tuple(dout.shape)}, {tuple(out.shape)}")
    B, Nq, Hq, D = q.shape
    Nk, Hkv = k.shape[1], k.shape[2]
    if tuple(lse.shape) != (B, Hq, Nq):
        raise ValueError(f"attention_bwd: lse must be ({B}, {Hq}, {Nq}); got {tuple(lse.shape)}")
    q, k, v, dout, out = (_last_dim_contiguous(x) for x in (q, k, v, dout, out))
    dout = dout.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    dq = torch.zeros((B, Nq, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.zeros((B, Nk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.zeros((B, Nk, Hkv, D), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq, dk, dv  # no pairs at all: every gradient is zero
    cu_q, cu_k, nseq, grid_q, grid_k, packed = _packed(varlen, q)
    mask, mask_strides, consts, fixed = _launch_args(q, key_padding_mask)
    feat, feat_consts = _feature_args(q, k, causal, softmax_scale, **(features or {}), batch=nseq)
    consts.update(feat_consts)
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    common = (Nq, Nk, Hq // Hkv, softmax_scale * _LOG2E, softmax_scale, *feat,
              _bucket(grid_q if packed else Nq), _bucket(grid_k if packed else Nk), cu_q, cu_k)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        pre_block = max(16, min(64, 8192 // consts["BLOCK_D"]))  # (pre_block, BLOCK_D) fp32 tiles stay in registers
        _attn_bwd_pre[(triton.cdiv(Nq, pre_block), B * Hq)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], Hq, Nq,
            HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=pre_block)
        st = lambda x: _strides(x, packed)  # noqa: E731
        dkdv_args = (q, k, v, dout, lse, delta, mask, dk, dv,
                     *st(q), *st(k), *st(v), *st(dout), *mask_strides, *st(dk), *st(dv), Hq, Hkv, *common)
        B, grid_q, grid_k = (nseq, grid_q, grid_k) if packed else (B, Nq, Nk)
        dkdv_grid = lambda meta: (triton.cdiv(grid_k, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
        dq_args = (q, k, v, dout, lse, delta, mask, dq,
                   *st(q), *st(k), *st(v), *st(dout), *mask_strides, *st(dq), Hq, *common)
        dq_grid = lambda meta: (triton.cdiv(grid_q, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        consts.update(VARLEN=packed)
        if fixed is None:
            _attn_bwd_dkdv_tuned[dkdv_grid](*dkdv_args, CAUSAL=bool(causal), **consts)
            _attn_bwd_dq_tuned[dq_grid](*dq_args, CAUSAL=bool(causal), **consts)
        else:
            _attn_bwd_dkdv[dkdv_grid](*dkdv_args, CAUSAL=bool(causal), **consts, **fixed)
            _attn_bwd_dq[dq_grid](*dq_args, CAUSAL=bool(causal), **consts, **fixed)
    return dq, dk, dv


def attention_ext_fwd(q, k, v, key_padding_mask, causal: bool, softmax_scale: float, window_left: int,
                      window_right: int, softcap: float, alibi_slopes, attn_bias, dropout_p: float, seed: int,
                      offset: int, drop_lq: int, drop_lk: int):
    """attention_fwd with FlashAttention's features; arguments as pyllm::attention_ext_fwd (csrc/pyllm.cpp)."""
    return attention_fwd(q, k, v, key_padding_mask, causal, softmax_scale, dict(
        window_left=window_left, window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
        attn_bias=attn_bias, dropout_p=dropout_p, seed=seed, offset=offset, drop_lq=drop_lq, drop_lk=drop_lk))


def attention_ext_bwd(dout, q, k, v, out, lse, key_padding_mask, causal: bool, softmax_scale: float,
                      window_left: int, window_right: int, softcap: float, alibi_slopes, attn_bias, dropout_p: float,
                      seed: int, offset: int, drop_lq: int, drop_lk: int, bias_grad: bool, deterministic: bool):
    """attention_bwd with the features; returns (dq, dk, dv, dbias), dbias summed to attn_bias's shape when
    bias_grad (the dQ kernel writes dS once per element into a (B, Hq, Nq, Nk) fp32 buffer), else shape (0,)."""
    B, Nq, Hq, _ = q.shape
    full = None
    if bias_grad and attn_bias is not None:
        full = torch.zeros((B, Hq, Nq, k.shape[1]), dtype=torch.float32, device=q.device)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, deterministic, dict(
        window_left=window_left, window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
        attn_bias=attn_bias, dropout_p=dropout_p, seed=seed, offset=offset, drop_lq=drop_lq, drop_lk=drop_lk,
        dbias=full))
    dbias = full.sum_to_size(attn_bias.shape).to(attn_bias.dtype) if full is not None else q.new_empty((0,))
    return dq, dk, dv, dbias


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                         softmax_scale: float, window_left: int, window_right: int, softcap: float, alibi_slopes,
                         dropout_p: float, seed: int, offset: int):
    """Packed sequences in one launch; arguments as pyllm::attention_varlen_fwd (csrc/pyllm.cpp): q (total_q, Hq, D),
    k, v (total_k, Hkv, D) -> out (total_q, Hq, D), lse (Hq, total_q)."""
    varlen = _varlen_check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "attention_varlen_fwd")
    out, lse = attention_fwd(q[None], k[None], v[None], None, causal, softmax_scale, dict(
        window_left=window_left, window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, seed=seed, offset=offset, drop_lq=max_seqlen_q, drop_lk=max_seqlen_k), varlen)
    return out[0], lse[0]


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         causal: bool, softmax_scale: float, window_left: int, window_right: int, softcap: float,
                         alibi_slopes, dropout_p: float, seed: int, offset: int, deterministic: bool):
    """The backward of :func:`attention_varlen_fwd`: (dq, dk, dv), packed like q, k, v."""
    varlen = _varlen_check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "attention_varlen_bwd")
    if tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise ValueError(f"attention_varlen_bwd: lse must be ({q.shape[1]}, {q.shape[0]}); got {tuple(lse.shape)}")
    dq, dk, dv = attention_bwd(dout[None], q[None], k[None], v[None], out[None], lse[None], None, causal,
                               softmax_scale, deterministic, dict(
                                   window_left=window_left, window_right=window_right, softcap=softcap,
                                   alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed, offset=offset,
                                   drop_lq=max_seqlen_q, drop_lk=max_seqlen_k), varlen)
    return dq[0], dk[0], dv[0]


def _varlen_check(q, k, v, cu_q, cu_k, max_q, max_k, fn):
    # Memory-safety guards for direct calls of the raw op (pyllm.attention_varlen validates with precise messages):
    # the kernels read rows cu[b]..cu[b+1], so the offsets must stay inside the tensors.
    ok = q.dim() == 3 and k.dim() == 3 and v.dim() == 3
    for cu, total, mx in ((cu_q, q.shape[0], max_q), (cu_k, k.shape[0], max_k)):
        ok = ok and cu.dtype == torch.int32 and cu.dim() == 1 and cu.numel() >= 1 and cu.device == q.device
        if ok:
            c = cu.tolist()
            ok = c[0] == 0 and c[-1] == total and all(0 <= b - a <= mx for a, b in zip(c, c[1:]))
    if not ok or cu_q.numel() != cu_k.numel():
        raise ValueError(f"{fn}: packed inputs the kernel cannot take: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"cu_seqlens {cu_q.tolist() if cu_q.numel() < 64 else '...'} / "
                         f"{cu_k.tolist() if cu_k.numel() < 64 else '...'} (call pyllm.attention_varlen for a "
                         "precise error)")
    return cu_q, cu_k, int(max_q), int(max_k)
