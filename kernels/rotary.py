"""Rotary position embeddings (RoPE) in Triton: q and k rotated in one call, forward and backward.

For each token (b, n) and head, with c = cos[b, n, i], s = sin[b, n, i] (i < R/2) and the pair

    rotate-half (GPT-NeoX, Llama):  (x1, x2) = (x[i], x[i + R/2])
    interleaved (GPT-J):            (x1, x2) = (x[2i], x[2i + 1])

the output is (x1 * c - x2 * s, x2 * c + x1 * s); dims R..D are copied. The backward pass is the
same rotation by -theta (conjugate=True: s -> -s), so one kernel serves both directions.

One program handles one token and BLOCK_H heads: a (BLOCK_H, R/2) tile of pairs, with the
token's cos/sin row loaded once and reused across heads. Math in fp32.

    rotary(q, k, cos, sin, interleaved, conjugate) -> (q_out, k_out)   (the contract of csrc/pyllm.cpp)

On CPU tensors this runs only under the Triton interpreter (TRITON_INTERPRET=1); there bf16 outputs
are rounded in software (the interpreter of triton 3.9 truncates fp32 -> bf16).
"""

import torch
import triton
import triton.language as tl

from .layer_norm import _round_to

__all__ = ["rotary"]


@triton.jit
def _rotary_kernel(
    X,  # pointer to the input, (B, N, H, D) with strides stride_xb, stride_xn, stride_xh, 1
    O,  # pointer to the output, (B, N, H, D) contiguous
    COS,  # pointer to cos, (Bc, N, HALF) contiguous; stride_cb = 0 when Bc == 1 (broadcast over batch)
    SIN,  # pointer to sin, same layout as COS
    N, H, D, HALF,  # sizes: seqlen, heads, head_dim, rotary_dim / 2
    stride_xb, stride_xn, stride_xh, stride_cb,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_HALF: tl.constexpr,  # >= HALF, a power of two
    BLOCK_REST: tl.constexpr,  # >= D - 2 * HALF (the copied tail), a power of two
):
    pid_t = tl.program_id(0)  # token: b * N + n
    pid_h = tl.program_id(1)
    b = pid_t // N
    n = pid_t % N
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    hm = heads < H
    im = i < HALF
    c = tl.load(COS + b * stride_cb + n * HALF + i, mask=im, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * stride_cb + n * HALF + i, mask=im, other=0.0).to(tl.float32)
    if CONJUGATE:
        s = -s
    x_row = X + b * stride_xb + n * stride_xn + heads[:, None] * stride_xh  # (BLOCK_H, 1) pointers
    o_row = O + ((b * N + n) * H + heads[:, None]) * D
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    m = hm[:, None] & im[None, :]
    x1 = tl.load(x_row + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2[None, :], mask=m, other=0.0).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    dt = O.dtype.element_ty
    tl.store(o_row + i1[None, :], _round_to(o1, dt, SOFT_BF16), mask=m)
    tl.store(o_row + i2[None, :], _round_to(o2, dt, SOFT_BF16), mask=m)
    if BLOCK_REST > 0:  # partial rotary: the tail is copied unchanged
        j = 2 * HALF + tl.arange(0, BLOCK_REST)
        mr = hm[:, None] & (j < D)[None, :]
        tail = tl.load(x_row + j[None, :], mask=mr, other=0.0)
        tl.store(o_row + j[None, :], tail, mask=mr)


def _check(name, x, q, cos):
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rotary: {name} must be a (batch, seqlen, heads, head_dim) fp32/fp16/bf16 tensor, "
                         f"got shape {tuple(x.shape)} {x.dtype}")
    if (x.shape[0], x.shape[1], x.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]) or x.dtype != q.dtype:
        raise ValueError(f"rotary: {name} has shape {tuple(x.shape)} {x.dtype}; expected q's batch, seqlen, "
                         f"head_dim and dtype")
    if x.shape[3] > 1 and x.stride(3) != 1:
        raise ValueError(f"rotary: {name}'s last dim must be contiguous")
    if 2 * cos.shape[2] > x.shape[3]:
        raise ValueError(f"rotary: cos has {cos.shape[2]} frequencies, more than head_dim {x.shape[3]} / 2")


def _rotate(x, cos, sin, interleaved, conjugate):
    B, N, H, D = x.shape
    half = cos.shape[2]
    out = torch.empty((B, N, H, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_h = min(triton.next_power_of_2(H), 16)
    rest = D - 2 * half
    _rotary_kernel[(B * N, triton.cdiv(H, block_h))](
        x, out, cos, sin, N, H, D, half,
        x.stride(0), x.stride(1), x.stride(2), 0 if cos.shape[0] == 1 else cos.stride(0),
        INTERLEAVED=interleaved, CONJUGATE=conjugate, SOFT_BF16=x.device.type == "cpu",
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
        BLOCK_REST=triton.next_power_of_2(rest) if rest > 0 else 0,
    )
    return out


def rotary(q, k, cos, sin, interleaved: bool, conjugate: bool):
    """q (B, N, Hq, D), k (B, N, Hk, D) (last dim contiguous); cos, sin (1 or B, N, R/2) float32
    contiguous, R <= D. Returns (q_out, k_out), contiguous, rotated by theta (by -theta if conjugate)."""
    _check("q", q, q, cos)
    _check("k", k, q, cos)
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape != sin.shape or cos.dim() != 3:
        raise ValueError(f"rotary: cos and sin must be float32 (1 or batch, seqlen, rotary_dim / 2), got "
                         f"{tuple(cos.shape)} {cos.dtype} and {tuple(sin.shape)} {sin.dtype}")
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate(q, cos, sin, interleaved, conjugate), _rotate(k, cos, sin, interleaved, conjugate)
