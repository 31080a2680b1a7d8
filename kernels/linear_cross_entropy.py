"""Fused linear cross-entropy in Triton: chunked torch matmuls plus one Triton kernel for the loss and the
softmax gradient, as Liger-Kernel does.

For each chunk of C tokens (the full (N, V) logits are never stored):

    logits = hidden[c] @ weight^T (+ bias)                 torch.mm (cuBLAS), the input dtype
    z      = float32 copy of logits, (C, V)
    kernel, one program per row, label y, smoothing e, softcap cap (0 = none):
        z_j  <- cap * tanh(z_j / cap)                       (when cap > 0)
        lse  =  log sum_j exp(z_j)                          (online max and sum over blocks of V)
        loss =  lse - (1 - e) z_y - e mean_j z_j + z_loss lse^2      (0 when y == ignore_index)
        z_j  <- s (softmax_j (1 + 2 z_loss lse) - e / V - (1 - e)[j == y]) (1 - tanh_j^2)
                                                            (s = 1 / n_valid for the mean)
    dhidden[c] = dz @ weight ;  dweight += dz^T @ hidden[c] (float32) ;  dbias += sum_rows dz

The launcher follows the op schema of csrc/pyllm.cpp:

    linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, z_loss,
                             mean, chunk_size, compute_grad) -> (loss, dhidden, dweight, dbias)

On CPU tensors it runs only under the Triton interpreter (TRITON_INTERPRET=1). The kernel reads and writes
float32 only (the bf16 casts happen in torch), so the interpreter's bf16 issues do not arise.
"""

import torch
import triton
import triton.language as tl

__all__ = ["linear_cross_entropy_fwd", "auto_chunk"]


@triton.jit
def _softcap(z, cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        z = cap * (2.0 * tl.sigmoid(2.0 * z / cap) - 1.0)  # cap * tanh(z / cap)
    return z


@triton.jit
def _lce_rows_kernel(
    Z,            # (C, V) float32 logits of the chunk; overwritten with dloss/dlogits when COMPUTE_GRAD
    stride_z,     # row stride of Z in elements
    LABELS,       # (C,) int64
    LOSS,         # (C,) float32 output: the loss of each row (0 for ignored rows)
    V,            # vocabulary size
    ignore_index,
    eps,          # label smoothing
    cap,          # softcap (used only when HAS_CAP)
    z_loss,       # coefficient of lse^2
    scale,        # gradient scale: 1 / n_valid (mean) or 1 (sum)
    HAS_CAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    y = tl.load(LABELS + row)
    valid = y != ignore_index
    cols = tl.arange(0, BLOCK)
    # pass 1: online max and sum of exp, and the sum of z for label smoothing
    m = -float("inf")
    s = 0.0
    sum_z = 0.0
    for off in range(0, V, BLOCK):
        mask = off + cols < V
        z = _softcap(tl.load(z_row + off + cols, mask=mask, other=0.0), cap, HAS_CAP)
        m_new = tl.maximum(m, tl.max(tl.where(mask, z, -float("inf")), 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(z - m_new), 0.0), 0)
        sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    in_range = (y >= 0) & (y < V)  # the op layer refuses other labels; never read outside the row
    y_safe = tl.where(valid & in_range, y, 0)
    z_y = _softcap(tl.load(z_row + y_safe), cap, HAS_CAP)
    loss = lse - (1.0 - eps) * z_y - eps * sum_z / V + z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if COMPUTE_GRAD:
        pmul = scale * (1.0 + 2.0 * z_loss * lse)
        shift = scale * eps / V
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            raw = tl.load(z_row + off + cols, mask=mask, other=0.0)
            z = _softcap(raw, cap, HAS_CAP)
            g = tl.exp(z - lse) * pmul - shift - tl.where(off + cols == y, scale * (1.0 - eps), 0.0)
            if HAS_CAP:
                t = z / cap
                g = g * (1.0 - t * t)
            tl.store(z_row + off + cols, tl.where(valid, g, 0.0), mask=mask)


def auto_chunk(N: int, H: int, V: int) -> int:
    """Liger's rule: chunks of about N / ceil(V / H) tokens keep a chunk's logits near the size of hidden;
    at least 256 rows (smaller chunks make inefficient matmuls). As csrc/linear_cross_entropy.h."""
    ratio = max(1, -(-V // max(H, 1)))
    c = max(1, -(-N // ratio))
    return max(1, min(max(triton.next_power_of_2(c), 256), N))


def linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index: int, label_smoothing: float,
                             softcap: float, z_loss: float, mean: bool, chunk_size: int, compute_grad: bool):
    """Loss and (with compute_grad) its gradients, chunk by chunk. Shapes and dtypes: csrc/pyllm.cpp."""
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H or weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} {weight.dtype} does not match "
                         f"hidden {tuple(hidden.shape)} {hidden.dtype}")
    if labels.shape != (N,) or labels.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: labels must be int64 of shape ({N},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    hidden, labels = hidden.contiguous(), labels.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    n_valid = int((labels != ignore_index).sum()) if N else 0
    scale = 1.0 / max(n_valid, 1) if mean else 1.0
    dhidden = torch.empty((N, H) if compute_grad else (0,), dtype=hidden.dtype, device=hidden.device)
    dweight = torch.zeros((V, H) if compute_grad else (0,), **f32)
    dbias = torch.zeros((V,) if (compute_grad and bias is not None) else (0,), **f32)
    loss_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    C = min(chunk_size, max(N, 1)) if chunk_size > 0 else auto_chunk(N, H, V)
    BLOCK = min(triton.next_power_of_2(V), 8192)
    for start in range(0, N, C):
        c = min(C, N - start)
        h = hidden[start:start + c]  # (c, H)
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()  # (c, V)
        z = logits.float()
        del logits
        loss = torch.empty((c,), **f32)
        _lce_rows_kernel[(c,)](z, z.stride(0), labels[start:start + c], loss, V, ignore_index,
                               float(label_smoothing), float(softcap), float(z_loss), scale,
                               HAS_CAP=softcap > 0, COMPUTE_GRAD=compute_grad, BLOCK=BLOCK)
        loss_sum += loss.sum(dtype=torch.float64)
        if not compute_grad:
            continue
        torch.mm(z.to(hidden.dtype), weight, out=dhidden[start:start + c])  # (c, H)
        dweight.addmm_(z.t(), h.float())  # bf16 products are exact in float32
        if bias is not None:
            dbias += z.sum(0)
    loss = (loss_sum / max(n_valid, 1) if mean else loss_sum).float()
    return loss, dhidden, dweight.to(weight.dtype), dbias.to(weight.dtype)
