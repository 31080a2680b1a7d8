"""Fused LayerNorm / RMSNorm in Triton, forward and backward.

Forward, for each row h of x (or of x + residual), with N the hidden size:

    LayerNorm:  mean = sum(h) / N
                var  = sum((h - mean)^2) / N          (biased variance)
                rstd = 1 / sqrt(var + eps)
                y    = (h - mean) * rstd * w + b
    RMSNorm:    rstd = 1 / sqrt(sum(h^2) / N + eps)
                y    = h * rstd * w

Backward, with xhat = (h - mean) * rstd (RMSNorm: h * rstd) and g = dy * w:

    c1 = sum(xhat * g) / N
    c2 = sum(g) / N                                   (0 for RMSNorm)
    dx = (g - (xhat * c1 + c2)) * rstd  [+ dh, the gradient flowing into the returned h]
    dw = sum over rows of dy * xhat
    db = sum over rows of dy

dx is a per-row computation. dw and db are reductions over rows, done in two deterministic
stages (no atomics): program g of the dx kernel sums its group of rows into row g of a
(num_groups, N) fp32 buffer, then a small kernel sums that buffer over groups. Rows longer
than one block get c1 and c2 from a separate kernel first, so that the dx kernel can walk the
row in chunks with the group's rows inside and keep each chunk's partial sums in registers.

A row that fits one block (BLOCK_N >= N) is read once in the forward pass and is normalized
in registers. Longer rows are walked in chunks of BLOCK_N: one pass for the statistics
(per-lane Welford, merged across lanes at the end), a second pass to normalize.
Statistics are always fp32; inputs may be fp32, fp16 or bf16.

The launchers follow the conventions of the pyllm op schemas (csrc/pyllm.cpp):

    layer_norm_fwd(x, weight, bias, residual, eps, rms) -> (y, h, mean, rstd)
    layer_norm_bwd(dy, h, weight, mean, rstd, dh, rms, has_bias) -> (dx, dweight, dbias)

On CPU tensors they run only under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported). There the rows are split at 4096 columns, so that tests of modest size
walk the chunked path too, and bf16 outputs are rounded in software (the interpreter of
triton 3.9 truncates fp32 -> bf16).
"""

import functools

import torch
import triton
import triton.language as tl

from pyllm.kernels import interpreting

__all__ = ["layer_norm_fwd", "layer_norm_bwd"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Rounds fp32 x to DTYPE, to nearest even.

    The interpreter (triton 3.9) truncates fp32 -> bf16 instead of rounding, which doubles the
    error of every bf16 output; with SOFT_BF16 the rounding is done on the bits instead
    (NaN payloads aside). Compiled kernels use the hardware conversion, which rounds correctly.
    """
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input x, (M, N), row stride stride_x
    RES,  # pointer to the residual, (M, N), row stride stride_res (unused without HAS_RES)
    W,  # pointer to the weight, (N,) (unused without HAS_W)
    B,  # pointer to the bias, (N,) (unused without HAS_B)
    Y,  # pointer to the output y, (M, N), row stride stride_y
    H,  # pointer to the output h = x + residual, (M, N), row stride stride_h (HAS_RES only)
    MEAN,  # pointer to the per-row mean, (M,) fp32 (unused for RMSNorm)
    RSTD,  # pointer to the per-row 1 / std, (M,) fp32
    stride_x,  # elements between two rows of x
    stride_res,  # elements between two rows of residual
    stride_y,  # elements between two rows of y
    stride_h,  # elements between two rows of h
    N,  # hidden size (columns per row)
    eps,  # added to the variance before the square root
    IS_RMS: tl.constexpr,  # RMSNorm (no mean subtraction, no bias) instead of LayerNorm
    HAS_W: tl.constexpr,  # whether W is given
    HAS_B: tl.constexpr,  # whether B is given
    HAS_RES: tl.constexpr,  # whether RES is given (then h is written to H)
    BLOCK_N: tl.constexpr,  # columns handled per step
    SINGLE_BLOCK: tl.constexpr,  # BLOCK_N >= N: the row stays in registers, read once
    SOFT_BF16: tl.constexpr,  # round to bf16 in software (the interpreter truncates)
):
    # One program per row; int64 so that row * stride cannot overflow on big tensors.
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    if HAS_RES:
        RES += row * stride_res
        H += row * stride_h
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        mask = cols < N
        h = tl.load(X + cols, mask=mask, other=0.0)
        if HAS_RES:
            # Rounded to the input dtype, as torch's x + residual is: h is returned, and the
            # backward pass normalizes the stored h again.
            r = tl.load(RES + cols, mask=mask, other=0.0)
            h = _round_to(h.to(tl.float32) + r.to(tl.float32), H.dtype.element_ty, SOFT_BF16)
            tl.store(H + cols, h, mask=mask)
        h = h.to(tl.float32)
        if IS_RMS:
            xhat_num = h
            var = tl.sum(h * h, axis=0) / N
        else:
            mean = tl.sum(h, axis=0) / N
            xhat_num = tl.where(mask, h - mean, 0.0)
            var = tl.sum(xhat_num * xhat_num, axis=0) / N
            tl.store(MEAN + row, mean)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(RSTD + row, rstd)
        y = xhat_num * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, _round_to(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)
    else:
        # Pass 1: statistics. For LayerNorm each lane runs Welford's update over the values it
        # sees (one per chunk); the lanes are merged at the end (Chan et al.). No cancellation
        # as with sum(h^2) - sum(h)^2, and only one read of the row.
        if IS_RMS:
            acc_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
            mu = tl.zeros([BLOCK_N], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h = tl.load(X + c, mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(RES + c, mask=mask, other=0.0)
                h = _round_to(h.to(tl.float32) + r.to(tl.float32), H.dtype.element_ty, SOFT_BF16)
                tl.store(H + c, h, mask=mask)
            h = h.to(tl.float32)
            if IS_RMS:
                acc_sq += h * h
            else:
                cnt += mask.to(tl.float32)
                delta = tl.where(mask, h - mu, 0.0)
                mu += delta / tl.maximum(cnt, 1.0)
                m2 += delta * (h - mu)  # zero on masked lanes, since delta is
        if IS_RMS:
            var = tl.sum(acc_sq, axis=0) / N
            mean = 0.0
        else:
            mean = tl.sum(cnt * mu, axis=0) / N
            d = mu - mean  # lanes that saw nothing have cnt == 0 and add nothing below
            var = (tl.sum(m2, axis=0) + tl.sum(cnt * d * d, axis=0)) / N
            tl.store(MEAN + row, mean)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(RSTD + row, rstd)

        # Pass 2: normalize. h is recomputed from x and residual (same rounding as in pass 1)
        # rather than read back from H, so nothing depends on this program's own stores.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            h = tl.load(X + c, mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(RES + c, mask=mask, other=0.0)
                h = _round_to(h.to(tl.float32) + r.to(tl.float32), X.dtype.element_ty, SOFT_BF16)
            h = h.to(tl.float32)
            if IS_RMS:
                y = h * rstd
            else:
                y = (h - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + c, _round_to(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _layer_norm_bwd_dx_kernel(
    DY,  # pointer to the output gradient dy, (M, N), row stride stride_dy
    H,  # pointer to the normalized input h, (M, N), row stride stride_h
    W,  # pointer to the weight, (N,) (unused without HAS_W)
    MEAN,  # pointer to the per-row mean, (M,) fp32 (unused for RMSNorm)
    RSTD,  # pointer to the per-row 1 / std, (M,) fp32
    DH,  # pointer to the gradient flowing into h, (M, N), row stride stride_dh (HAS_DH only)
    DX,  # pointer to the input gradient dx, (M, N), row stride stride_dx
    PART_DW,  # pointer to the partial dw sums, (num_groups, N) fp32 (COMPUTE_DW only)
    PART_DB,  # pointer to the partial db sums, (num_groups, N) fp32 (COMPUTE_DB only)
    ROW_SUMS,  # pointer to c1, c2 per row, (2, M) fp32 (only without SINGLE_BLOCK)
    stride_dy,  # elements between two rows of dy
    stride_h,  # elements between two rows of h
    stride_dh,  # elements between two rows of dh
    stride_dx,  # elements between two rows of dx
    M,  # number of rows
    N,  # hidden size (columns per row)
    rows_per_group,  # rows each program handles: [g * rows_per_group, (g + 1) * rows_per_group)
    IS_RMS: tl.constexpr,  # RMSNorm (no mean) instead of LayerNorm
    HAS_W: tl.constexpr,  # whether W is given
    HAS_DH: tl.constexpr,  # whether DH is given (added into dx)
    COMPUTE_DW: tl.constexpr,  # write partial sums of dy * xhat to PART_DW
    COMPUTE_DB: tl.constexpr,  # write partial sums of dy to PART_DB
    BLOCK_N: tl.constexpr,  # columns handled per step
    SINGLE_BLOCK: tl.constexpr,  # BLOCK_N >= N: each row is read once, partial sums stay in registers
    SOFT_BF16: tl.constexpr,  # round to bf16 in software (the interpreter truncates)
):
    group = tl.program_id(0).to(tl.int64)
    row_start = group * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    PART_DW += group * N
    PART_DB += group * N
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_BLOCK:
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                xhat = h * rstd
            else:
                mean = tl.load(MEAN + row)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
            g = dy  # zero on masked lanes, since dy is
            if HAS_W:
                g = dy * w
            c1 = tl.sum(xhat * g, axis=0) / N
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=0) / N
                dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, _round_to(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask)
            if COMPUTE_DW:
                acc_dw += dy * xhat
            if COMPUTE_DB:
                acc_db += dy
        if COMPUTE_DW:
            tl.store(PART_DW + cols, acc_dw, mask=mask)
        if COMPUTE_DB:
            tl.store(PART_DB + cols, acc_db, mask=mask)
    else:
        # Rows longer than one block. c1 and c2 come precomputed from the row-sums kernel, so the
        # loop runs chunk by chunk with the group's rows inside: each chunk's partial sums of dw
        # and db stay in registers and are stored once.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            if HAS_W:
                w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            acc_dw = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_db = tl.zeros([BLOCK_N], dtype=tl.float32)
            for row in range(row_start, row_end):
                h = tl.load(H + row * stride_h + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                c1 = tl.load(ROW_SUMS + row)
                if IS_RMS:
                    xhat = h * rstd
                else:
                    mean = tl.load(MEAN + row)
                    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                g = dy
                if HAS_W:
                    g = dy * w
                if IS_RMS:
                    dx = (g - xhat * c1) * rstd
                else:
                    c2 = tl.load(ROW_SUMS + M + row)
                    dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + c, _round_to(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask)
                if COMPUTE_DW:
                    acc_dw += dy * xhat
                if COMPUTE_DB:
                    acc_db += dy
            if COMPUTE_DW:
                tl.store(PART_DW + c, acc_dw, mask=mask)
            if COMPUTE_DB:
                tl.store(PART_DB + c, acc_db, mask=mask)


@triton.jit
def _layer_norm_bwd_row_sums_kernel(
    DY,  # pointer to the output gradient dy, (M, N), row stride stride_dy
    H,  # pointer to the normalized input h, (M, N), row stride stride_h
    W,  # pointer to the weight, (N,) (unused without HAS_W)
    MEAN,  # pointer to the per-row mean, (M,) fp32 (unused for RMSNorm)
    RSTD,  # pointer to the per-row 1 / std, (M,) fp32
    ROW_SUMS,  # pointer to the output, (2, M) fp32: c1 = sum(xhat * g) / N, then c2 = sum(g) / N
    stride_dy,  # elements between two rows of dy
    stride_h,  # elements between two rows of h
    M,  # number of rows
    N,  # hidden size
    IS_RMS: tl.constexpr,  # RMSNorm (no mean, no c2) instead of LayerNorm
    HAS_W: tl.constexpr,  # whether W is given
    BLOCK_N: tl.constexpr,  # columns handled per step
):
    # Only for rows longer than one block; shorter rows get c1, c2 inside the dx kernel.
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy
    H += row * stride_h
    rstd = tl.load(RSTD + row)
    if IS_RMS:
        mean = 0.0
    else:
        mean = tl.load(MEAN + row)
    cols = tl.arange(0, BLOCK_N)
    acc_c1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_c2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        mask = c < N
        h = tl.load(H + c, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + c, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        g = dy
        if HAS_W:
            g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
        acc_c1 += xhat * g
        acc_c2 += g
    tl.store(ROW_SUMS + row, tl.sum(acc_c1, axis=0) / N)
    if not IS_RMS:
        tl.store(ROW_SUMS + M + row, tl.sum(acc_c2, axis=0) / N)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    PART_DW,  # pointer to the partial dw sums, (G, N) fp32 contiguous (COMPUTE_DW only)
    PART_DB,  # pointer to the partial db sums, (G, N) fp32 contiguous (COMPUTE_DB only)
    DW,  # pointer to the weight gradient, (N,)
    DB,  # pointer to the bias gradient, (N,)
    G,  # number of groups (rows of the partial buffers)
    N,  # hidden size
    COMPUTE_DW: tl.constexpr,  # reduce PART_DW into DW
    COMPUTE_DB: tl.constexpr,  # reduce PART_DB into DB
    BLOCK_G: tl.constexpr,  # partial rows summed per step
    BLOCK_N: tl.constexpr,  # columns per program
    SOFT_BF16: tl.constexpr,  # round to bf16 in software (the interpreter truncates)
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc_dw = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    # A fixed order of summation: the result is the same on every run.
    for g0 in range(0, G, BLOCK_G):
        rows = (g0 + tl.arange(0, BLOCK_G)).to(tl.int64)
        mask = (rows[:, None] < G) & mask_n[None, :]
        offs = rows[:, None] * N + cols[None, :]  # (BLOCK_G, BLOCK_N)
        if COMPUTE_DW:
            acc_dw += tl.load(PART_DW + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            acc_db += tl.load(PART_DB + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(DW + cols, _round_to(tl.sum(acc_dw, axis=0), DW.dtype.element_ty, SOFT_BF16), mask=mask_n)
    if COMPUTE_DB:
        tl.store(DB + cols, _round_to(tl.sum(acc_db, axis=0), DB.dtype.element_ty, SOFT_BF16), mask=mask_n)


# ---------------------------------------------------------------------------------------------
# Launch heuristics
# ---------------------------------------------------------------------------------------------

# triton.jit decides when this module is imported: TRITON_INTERPRET=1 then gives interpreted
# functions, which run on CPU tensors (and copy CUDA tensors to the host and back).
_INTERPRETED = interpreting()

# Largest row kept whole in registers (elements). On a GPU, 16K fp32 values over 16 warps are
# 32 registers per thread per live tensor; the backward pass keeps more tensors live, so it
# stops earlier (ptxas, sm_90: forward 16384 fits in 128 registers without spilling; backward
# 8192 spills 8-16 bytes per thread). The interpreter pays per operation more than per element, so bigger blocks are
# cheaper there; its limit is kept at 4096 so that the tests walk the chunked path too.
_GPU_MAX_FUSED_FWD = 16384
_GPU_MAX_FUSED_BWD = 8192
_GPU_CHUNK = 4096
_INTERPRETER_MAX_FUSED = 4096
_INTERPRETER_CHUNK = 4096


def _block_config(n: int, device: torch.device, backward: bool):
    """-> (BLOCK_N, SINGLE_BLOCK, num_warps) for rows of n elements."""
    if _INTERPRETED:
        max_fused, chunk = _INTERPRETER_MAX_FUSED, _INTERPRETER_CHUNK
    else:
        max_fused = _GPU_MAX_FUSED_BWD if backward else _GPU_MAX_FUSED_FWD
        chunk = _GPU_CHUNK
    if n <= max_fused:
        block_n, single = triton.next_power_of_2(n), True
    else:
        block_n, single = chunk, False
    # About 8 fp32 values per thread per live tensor at the sizes that matter.
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, single, num_warps


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _resident_warps(device_index: int) -> int:
    """Warps per SM the backward pass aims to keep busy: 32 on sm_80; 48 on sm_90, whose HBM3 needs about
    1.6x the bytes in flight of an A100's to reach its bandwidth (same 64-warp limit per SM)."""
    return 48 if torch.cuda.get_device_capability(device_index)[0] == 9 else 32


def _num_groups(m: int, device: torch.device, num_warps: int) -> int:
    """How many programs share the m rows in the backward pass (= rows of the partial buffers)."""
    if not _INTERPRETED:
        # About 32 resident warps per SM: enough loads in flight, and a partial buffer that is
        # small next to the M x N tensors once M is in the thousands.
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = _num_sms(index) * max(_resident_warps(index) // num_warps, 1)
    else:
        target = 4  # the interpreter runs programs one after another; few is cheapest
    rows_per_group = triton.cdiv(m, min(m, target))
    return triton.cdiv(m, rows_per_group)  # no empty group


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_rows(name: str, t: torch.Tensor, shape, dtype, device):
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"layer_norm: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"layer_norm: {name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"layer_norm: {name} is on {t.device}, expected {device} like the input")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"layer_norm: {name} must have stride(1) == 1, got strides {tuple(t.stride())}")


def _check_param(name: str, t: torch.Tensor, n: int, x_dtype, device):
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"layer_norm: {name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype not in (x_dtype, torch.float32):
        raise ValueError(f"layer_norm: {name} must have dtype {x_dtype} or torch.float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"layer_norm: {name} is on {t.device}, expected {device} like the input")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"layer_norm: {name} must be contiguous, got stride {t.stride(0)}")


def _check_stats(name: str, t: torch.Tensor, m: int, device):
    if tuple(t.shape) != (m,) or t.dtype != torch.float32:
        raise ValueError(f"layer_norm: {name} must be ({m},) torch.float32, got {tuple(t.shape)} {t.dtype}")
    if t.device != device:
        raise ValueError(f"layer_norm: {name} is on {t.device}, expected {device} like the input")
    if m > 1 and t.stride(0) != 1:
        raise ValueError(f"layer_norm: {name} must be contiguous, got stride {t.stride(0)}")


def _check_input(name: str, x: torch.Tensor):
    if x.device.type != "cuda" and not (_INTERPRETED and x.device.type == "cpu"):
        raise ValueError(
            f"layer_norm: {name} is on {x.device}; the Triton kernels take CUDA tensors, or CPU tensors "
            "when TRITON_INTERPRET=1 was set before triton was imported"
        )
    if x.dim() != 2:
        raise ValueError(f"layer_norm: {name} must be 2-D (M, N), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"layer_norm: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"layer_norm: hidden size must be at least 1, got {name} of shape {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"layer_norm: {name} must have stride(1) == 1, got strides {tuple(x.stride())}")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def layer_norm_fwd(x, weight, bias, residual, eps: float, rms: bool):
    """LayerNorm / RMSNorm forward over the last dim of x, optionally of x + residual.

    x        (M, N), stride(1) == 1, any row stride; float32 / float16 / bfloat16
    weight   (N,) or None, dtype x.dtype or float32;  bias (N,) or None, same rule (LayerNorm only)
    residual (M, N) or None, x.dtype, stride(1) == 1; when given, h = x + residual is normalized
    Returns (y, h, mean, rstd):
    y        (M, N) contiguous, x.dtype
    h        (M, N) contiguous, x.dtype, the residual sum; shape (0,) when residual is None
    mean     (M,) float32; shape (0,) when rms
    rstd     (M,) float32, 1 / sqrt(var + eps) (rms: 1 / sqrt(mean(h^2) + eps))
    """
    _check_input("x", x)
    M, N = x.shape
    device = x.device
    if weight is not None:
        _check_param("weight", weight, N, x.dtype, device)
    if bias is not None:
        if rms:
            raise ValueError(
                f"layer_norm: bias must be None when rms=True (RMSNorm has no bias), got shape {tuple(bias.shape)}"
            )
        _check_param("bias", bias, N, x.dtype, device)
    if residual is not None:
        _check_rows("residual", residual, (M, N), x.dtype, device)

    y = torch.empty((M, N), dtype=x.dtype, device=device)
    h = torch.empty((M, N) if residual is not None else (0,), dtype=x.dtype, device=device)
    mean = torch.empty((0,) if rms else (M,), dtype=torch.float32, device=device)
    rstd = torch.empty((M,), dtype=torch.float32, device=device)
    if M == 0:
        return y, h, mean, rstd

    block_n, single, num_warps = _block_config(N, device, backward=False)
    # Unused pointer arguments get a real tensor of the right device, never None.
    _layer_norm_fwd_kernel[(M,)](
        x,
        residual if residual is not None else x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        y,
        h if residual is not None else y,
        mean if not rms else rstd,
        rstd,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        h.stride(0) if residual is not None else 0,
        N,
        float(eps),
        IS_RMS=bool(rms),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_RES=residual is not None,
        BLOCK_N=block_n,
        SINGLE_BLOCK=single,
        SOFT_BF16=_INTERPRETED,
        num_warps=num_warps,
    )
    return y, h, mean, rstd


def layer_norm_bwd(dy, h, weight, mean, rstd, dh, rms: bool, has_bias: bool):
    """Backward of layer_norm_fwd.

    dy       (M, N), stride(1) == 1, h's dtype;  h: the tensor that was normalized (x, or x + residual)
    weight   (N,) or None, h.dtype or float32
    mean     (M,) float32 (ignored, may be (0,), when rms);  rstd (M,) float32
    dh       (M, N) or None, h.dtype: gradient flowing into the returned h, added to dx
    Returns (dx, dweight, dbias):
    dx       (M, N) contiguous, h.dtype (also the gradient of residual)
    dweight  (N,) weight.dtype; shape (0,) when weight is None
    dbias    (N,) weight.dtype (h.dtype if weight is None); shape (0,) when not has_bias
    """
    _check_input("h", h)
    M, N = h.shape
    device = h.device
    _check_rows("dy", dy, (M, N), h.dtype, device)
    if weight is not None:
        _check_param("weight", weight, N, h.dtype, device)
    if rms and has_bias:
        raise ValueError("layer_norm: has_bias must be False when rms=True (RMSNorm has no bias), got True")
    if not rms:
        _check_stats("mean", mean, M, device)
    _check_stats("rstd", rstd, M, device)
    if dh is not None:
        _check_rows("dh", dh, (M, N), h.dtype, device)

    param_dtype = weight.dtype if weight is not None else h.dtype
    dx = torch.empty((M, N), dtype=h.dtype, device=device)
    dweight = torch.empty((N,) if weight is not None else (0,), dtype=param_dtype, device=device)
    dbias = torch.empty((N,) if has_bias else (0,), dtype=param_dtype, device=device)
    if M == 0:
        dweight.zero_()
        dbias.zero_()
        return dx, dweight, dbias

    block_n, single, num_warps = _block_config(N, device, backward=True)
    groups = _num_groups(M, device, num_warps)
    rows_per_group = triton.cdiv(M, groups)
    compute_dw, compute_db = weight is not None, bool(has_bias)
    part_dw = torch.empty((groups, N), dtype=torch.float32, device=device) if compute_dw else rstd
    part_db = torch.empty((groups, N), dtype=torch.float32, device=device) if compute_db else rstd
    if single:
        row_sums = rstd  # unused: the dx kernel computes them from the row it holds
    else:
        row_sums = torch.empty((2, M), dtype=torch.float32, device=device)
        _layer_norm_bwd_row_sums_kernel[(M,)](
            dy,
            h,
            weight if weight is not None else h,
            mean if not rms else rstd,
            rstd,
            row_sums,
            dy.stride(0),
            h.stride(0),
            M,
            N,
            IS_RMS=bool(rms),
            HAS_W=weight is not None,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )

    _layer_norm_bwd_dx_kernel[(groups,)](
        dy,
        h,
        weight if weight is not None else h,
        mean if not rms else rstd,
        rstd,
        dh if dh is not None else dy,
        dx,
        part_dw,
        part_db,
        row_sums,
        dy.stride(0),
        h.stride(0),
        dh.stride(0) if dh is not None else 0,
        dx.stride(0),
        M,
        N,
        rows_per_group,
        IS_RMS=bool(rms),
        HAS_W=weight is not None,
        HAS_DH=dh is not None,
        COMPUTE_DW=compute_dw,
        COMPUTE_DB=compute_db,
        BLOCK_N=block_n,
        SINGLE_BLOCK=single,
        SOFT_BF16=_INTERPRETED,
        num_warps=num_warps,
    )

    if compute_dw or compute_db:
        if _INTERPRETED:
            block_g, block_nr = 4, min(triton.next_power_of_2(N), 4096)
        else:
            block_g, block_nr = 32, min(triton.next_power_of_2(N), 128)
        _layer_norm_bwd_reduce_kernel[(triton.cdiv(N, block_nr),)](
            part_dw,
            part_db,
            dweight if compute_dw else dx,
            dbias if compute_db else dx,
            groups,
            N,
            COMPUTE_DW=compute_dw,
            COMPUTE_DB=compute_db,
            BLOCK_G=block_g,
            BLOCK_N=block_nr,
            SOFT_BF16=_INTERPRETED,
            num_warps=4,
        )
    return dx, dweight, dbias
