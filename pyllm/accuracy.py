"""The accuracy rule, written once: FlashAttention's 2x rule, its reference precision, and its inputs.

A fast path's max error against a reference computed in higher precision must be at most twice the error
PyTorch itself makes in the input's precision, plus 1e-5, for the outputs and every gradient::

    max|fast - ref_hi| <= 2 * max|torch_same_dtype - ref_hi| + 1e-5        (+ rel_floor * max|ref_hi|)

``ref_hi`` is computed in :func:`reference_dtype` (float64 for fp32/fp64 inputs, float32 for fp16/bf16).
``pyllm check``, the test suite (through :mod:`pyllm.check`) and ``pyllm bench`` all use :func:`allowed_error`
and the input generators below.

The one parameter, ``rel_floor``, is 0 for pyllm's own kernels (the strict rule). ``pyllm bench`` also checks
peer libraries and PyTorch's own native kernels before timing them, and some of those fail the strict rule
although they are not wrong (torch's bf16 CPU LayerNorm accumulates dweight/dbias in bf16); for them it
passes :data:`PEER_REL_FLOOR`, a floor relative to the reference's magnitude, so that summation-order noise
is not called wrong while a real bug (errors of the order of the values) still is.
"""
from __future__ import annotations

from typing import Sequence

import torch

ATOL = 1e-5

# The looser gate for peers (see the module docstring), per dtype name: ``rel_floor`` x max|reference|.
PEER_REL_FLOOR = {"fp64": 1e-10, "fp32": 1e-5, "fp16": 1e-3, "bf16": 4e-3}


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the reference a ``dtype`` result is held to: float64 for fp32/fp64, else float32."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def max_error(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max|a - b| in float64; inf when only one exists or the shapes differ (NaN stays NaN: it fails)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def allowed_error(baseline_error: float, *, rel_floor: float = 0.0, ref_max: float = 0.0) -> float:
    """The rule: ``2 * baseline_error + ATOL + rel_floor * ref_max``.

    ``baseline_error`` is PyTorch's own error in the input precision against the same reference;
    ``rel_floor`` (0 = the strict rule) and ``ref_max`` (max|reference|) give the peer gate of ``pyllm bench``.
    """
    return 2 * baseline_error + ATOL + rel_floor * ref_max


def passes(error: float, allowed: float) -> bool:
    return error <= allowed  # NaN compares False: a NaN result is wrong


def compare(names: Sequence[str], fast: Sequence, ref: Sequence, base: Sequence, *,
            rel_floor: float = 0.0) -> list[tuple[str, float, float]]:
    """[(name, error, allowed)] for each tensor: ``fast`` and ``base`` (PyTorch in the input precision)
    against ``ref`` (computed in :func:`reference_dtype`)."""
    rows = []
    for name, f, r, b in zip(names, fast, ref, base):
        ref_max = r.detach().abs().max().item() if (r is not None and r.numel()) else 0.0
        rows.append((name, max_error(f, r), allowed_error(max_error(b, r), rel_floor=rel_floor, ref_max=ref_max)))
    return rows


# ---------------------------------------------------------------- inputs
def padding_mask(B: int, Nk: int, device=None, *, min_keys: int = 0) -> torch.Tensor:
    """(B, Nk) bool key-padding mask, True = a real token. Row 0 keeps all keys, row b > 0 keeps the first
    ``Nk - b * (Nk // B) - 1`` (at least ``min_keys``): with ``min_keys=0`` a short row may see no key at
    all, which the kernels must answer with zeros; peers that return NaN there are checked with 1."""
    lens = [max(Nk - b * (Nk // max(B, 1)) - (1 if b else 0), min_keys, 0) for b in range(B)]
    mask = torch.arange(Nk)[None, :] < torch.tensor(lens, dtype=torch.long)[:, None]
    return mask.to(device) if device is not None else mask


def _randn(g: torch.Generator, dtype, device):
    return lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def attention_inputs(B: int, Nq: int, Nk: int, Hq: int, Hkv: int, D: int, *, dtype=torch.float32, device="cpu",
                     padded: bool = False, min_keys: int = 0, seed: int = 0) -> dict:
    """q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D), dout like q, and ``mask`` (:func:`padding_mask` or None);
    drawn in that order from a CPU generator seeded with ``seed``, so every device gets the same values."""
    mk = _randn(torch.Generator(device="cpu").manual_seed(seed), dtype, device)
    q, k, v, dout = mk(B, Nq, Hq, D), mk(B, Nk, Hkv, D), mk(B, Nk, Hkv, D), mk(B, Nq, Hq, D)
    mask = padding_mask(B, Nk, device, min_keys=min_keys) if padded else None
    return {"q": q, "k": k, "v": v, "dout": dout, "mask": mask}


def norm_inputs(op: str, M: int, N: int, *, dtype=torch.float32, device="cpu", residual: bool = False,
                affine: bool = True, seed: int = 0) -> dict:
    """x, dy (M, N); residual ``r`` and its output gradient ``dh`` (M, N) or None; weight ``w`` = 1 + 0.1 * randn
    and, for layer_norm, bias ``b`` = 0.1 * randn, both (N,), or None when not ``affine``."""
    mk = _randn(torch.Generator(device="cpu").manual_seed(seed), dtype, device)
    x, dy = mk(M, N), mk(M, N)
    r = mk(M, N) if residual else None
    w = (1 + 0.1 * mk(N)) if affine else None
    b = (0.1 * mk(N)) if (affine and op == "layer_norm") else None
    dh = 0.5 * dy if residual else None
    return {"x": x, "r": r, "w": w, "b": b, "dy": dy, "dh": dh}
