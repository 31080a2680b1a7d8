"""Fused linear cross-entropy: the final projection and the loss, chunk by chunk over the tokens.

``F.cross_entropy(F.linear(hidden, weight, bias), labels)`` stores the (tokens, vocab) logits, their
log-softmax and their gradient -- with a vocabulary of 32k-150k, the largest tensors of a decoder's
training step. The kernel backends (cpu, cuda, triton) compute the logits of a chunk of tokens at a time
and, while they have them, the loss and the gradients of hidden, weight and bias (as Liger-Kernel does);
the backward pass only scales those gradients by the incoming scalar. Peak memory beyond the inputs is
one chunk of logits (in float32) plus the gradients themselves, whatever the number of tokens.

Chosen over recomputing the logits in the backward pass: one matmul fewer (3 instead of 4 per chunk).
The cost: a forward pass with grad enabled holds dhidden and dweight until backward, and reductions are
limited to "mean" and "sum" (a scalar loss).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pyllm import backends, reference
from pyllm.ops import _checks

_FN = "linear_cross_entropy"


def _check(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction, z_loss, chunk_size):
    _checks.tensor(_FN, "hidden", hidden)
    _checks.tensor(_FN, "weight", weight, ndim=2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{_FN}: hidden has {hidden.shape[-1] if hidden.dim() else 0} features "
                         f"but weight (vocab, hidden) = {tuple(weight.shape)} expects {weight.shape[1]}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{_FN}: labels must be an int64 tensor, got {got}")
    _checks.same_device(_FN, "hidden", hidden, weight=weight, labels=labels, bias=bias)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_FN}: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if bias is not None:
        _checks.tensor(_FN, "bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{_FN}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{_FN}: ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_FN}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf):
        raise ValueError(f"{_FN}: softcap must be None or a finite float > 0, got {softcap!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{_FN}: reduction must be 'mean' or 'sum', got {reduction!r} (the fused op computes "
                         f"gradients in the forward pass, which needs a scalar loss)")
    if not isinstance(z_loss, (int, float)) or not 0.0 <= z_loss < math.inf:
        raise ValueError(f"{_FN}: z_loss must be a finite float >= 0, got {z_loss!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_FN}: chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Eager only (a data-dependent check would break a torch.compile graph; the C++ kernels check too)."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"{_FN}: labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {value}")


def _call(hidden: Tensor, weight: Tensor) -> dict:
    call = {"device": hidden.device, "dtype": hidden.dtype, "vocab": weight.shape[0]}
    if hidden.numel() == 0 or weight.numel() == 0:
        call["unsupported"] = ["empty hidden or weight (served by the reference)"]
    return call


def _describe(hidden, weight, labels, *, bias=None, ignore_index=-100, label_smoothing=0.0, softcap=None,
              reduction="mean", z_loss=0.0, chunk_size=None, **_):
    _check(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction, z_loss, chunk_size)
    return _FN, _call(hidden, weight)


def _kernel_fwd(name: str):
    if name == "triton":
        return torch.ops.pyllm.triton_linear_cross_entropy_fwd
    return torch.ops.pyllm.linear_cross_entropy_fwd  # the C++ op: CPU or CUDA kernel by the tensors' device


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
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` without storing the logits.

    hidden: (..., H); weight: (V, H) (an ``nn.Linear(H, V)``'s weight); bias: (V,); labels: hidden's leading
    shape, int64, each in [0, V) or ``ignore_index`` (those tokens add nothing). ``label_smoothing`` and
    ``ignore_index`` mean what they mean in ``F.cross_entropy``. ``softcap``: the logits are capped first,
    ``softcap * tanh(logits / softcap)`` (Gemma 2). ``z_loss``: adds ``z_loss * logsumexp(logits)^2`` per
    token (PaLM's auxiliary loss). ``reduction``: "mean" over the non-ignored tokens (0 when there are none;
    torch gives NaN) or "sum". ``chunk_size``: tokens per chunk (default: about N / ceil(V / H), so a chunk's
    logits are about the size of hidden, and at least 256; on the cpu backend at least as many as fit 16 MiB
    of float32 logits, e.g. 4096 for V 1000, 512 for V 8192; every chunk's logits are written into one buffer
    per call).

    Returns a 0-d loss, float32 for fp16/bf16/fp32 inputs (float64 for float64). hidden, weight and bias
    are cast to one dtype: autocast's when it is enabled (as for ``F.linear``), else their promoted type.
    """
    _check(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, reduction, z_loss, chunk_size)
    if torch.is_autocast_enabled(hidden.device.type):  # what autocast would run F.linear in
        dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        dtype = hidden.dtype if bias is None else torch.promote_types(hidden.dtype, bias.dtype)
        dtype = torch.promote_types(dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    vocab = weight.shape[0]
    _check_label_values(labels, vocab, ignore_index)
    name = backends.select(_FN, _call(hidden, weight), backend)
    if name == "reference":
        loss = reference.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, softcap=softcap,
                                              reduction=reduction, z_loss=z_loss)
        return loss.to(torch.float64 if dtype == torch.float64 else torch.float32)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, _, _, _ = _kernel_fwd(name)(h2, weight, labels.reshape(-1), bias, ignore_index, float(label_smoothing),
                                      float(softcap or 0.0), float(z_loss), reduction == "mean",
                                      chunk_size or 0, grad)
    return loss


backends.register_op(_FN, _describe)
