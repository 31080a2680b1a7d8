"""``Linear``: ``torch.nn.Linear`` (same parameters, state_dict and initialization) whose inference calls on a
few rows run pyllm's decode GEMV.

A generation step multiplies the batch's B new tokens (B rows) by every weight of the model, so its time is the
time to read the weights. Under ``torch.no_grad`` (or inference mode), for fp32 inputs on the CPU with 2 to
``DECODE_ROWS`` rows, ``forward`` calls ``pyllm::linear_decode`` (csrc/cpu/linear_decode.cpp), which streams each
weight once for all rows; MKL's sgemm, built for many rows, reads them at a fraction of the memory bandwidth
there; ``torch.compile`` traces the op too (its fake kernel is registered here). One row takes the kernel too,
except where torch's one-row product is MKL's gemv on an Intel CPU, which already streams at the copy bandwidth
(the kernel measured 2-5% behind it there): MKL picks its code path by CPU vendor, and on an AMD EPYC (Zen 4) its
gemv read the weights at 10-18 GB/s where this kernel read them at 19-34 GB/s and ``Tensor.sum`` at 26-43 GB/s
(1.4-2.4x, 2026-12-01). :func:`decode_min_rows` says which. Everything else (training, autograd, fewer rows than
that or more than ``DECODE_ROWS``, other dtypes and devices, the "reference" backend) is ``F.linear``, unchanged.
Results are fp32 like F.linear's, summed in another order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyllm import _ext, backends

DECODE_ROWS = 16  # up to this many rows (batch x new tokens) take the decode kernel


def _cpu_vendor() -> str:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _one_row_to_kernel() -> bool:
    """Whether one-row calls take the kernel too: it runs (AVX-512) and torch's gemv is not MKL's on an Intel CPU
    (an unknown vendor keeps torch's gemv, as before)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False  # the kernel would hand the call to at::linear anyway
    vendor = _cpu_vendor()
    return bool(vendor) and not (vendor == "GenuineIntel" and torch.backends.mkl.is_available())


_READY = _ext.has_kernel("linear_decode", "CPU")  # False with an extension built before the op existed
DECODE_MIN_ROWS = 1 if _one_row_to_kernel() else 2  # from this many rows (module docstring)
_op = None
if _READY:
    _op = torch.ops.pyllm.linear_decode.default

    @torch.library.register_fake("pyllm::linear_decode")
    def _linear_decode_fake(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def decode_rows() -> int:
    """Inference calls on :func:`decode_min_rows` to this many rows run the decode kernel (0: this extension has
    none); for code that must follow ``Linear.forward``'s choice without calling it (pyllm.models' one-call decode
    step)."""
    return DECODE_ROWS if _READY else 0


def decode_min_rows() -> int:
    """The fewest rows an inference call needs to run the decode kernel: 1, or 2 where one row stays with torch's
    gemv (MKL's on an Intel CPU; module docstring)."""
    return DECODE_MIN_ROWS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` by :class:`Linear`'s rule: x (..., K), weight (N, K), bias (N,) or None ->
    (..., N); fp32 inference on 1 (or 2) to 16 rows on the CPU runs ``pyllm::linear_decode`` (module docstring)."""
    # cheapest tests first: a decode step makes ~50 of these calls. The kernel serves fp32 and hands other dtypes
    # to at::linear itself; it has no autograd, so it runs only with grad mode off.
    n = weight.shape[-1]
    if (_READY and not torch.is_grad_enabled() and x.is_cpu and DECODE_MIN_ROWS * n <= x.numel() <= DECODE_ROWS * n
            and backends.requested(backend) != "reference"):
        return _op(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear``; fp32 inference on 1 (or 2) to 16 rows on the CPU runs ``pyllm::linear_decode`` (module
    docstring; :func:`linear` is the same as a function)."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.backend)
