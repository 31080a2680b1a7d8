"""``Linear``: ``torch.nn.Linear`` (same parameters, state_dict and initialization) whose inference calls on a
few rows run pyllm's decode GEMV.

A generation step multiplies the batch's B new tokens (B rows) by every weight of the model, so its time is the
time to read the weights. Under ``torch.no_grad`` (or inference mode), for fp32 inputs on the CPU with 2 to
``DECODE_ROWS`` rows, ``forward`` calls ``pyllm::linear_decode`` (csrc/cpu/linear_decode.cpp), which streams each
weight once for all rows; MKL's sgemm, built for many rows, reads them at a fraction of the memory bandwidth
there; ``torch.compile`` traces the op too (its fake kernel is registered here). One row stays with MKL's gemv,
which already streams at the copy bandwidth (the kernel measured 2-5% behind it). Everything else (training,
autograd, one row or more than ``DECODE_ROWS``, other dtypes and devices, the "reference" backend) is
``F.linear``, unchanged. Results are fp32 like F.linear's, summed in another order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyllm import _ext, backends

DECODE_ROWS = 16  # 2 to this many rows (batch x new tokens) take the decode kernel


_READY = _ext.has_kernel("linear_decode", "CPU")  # False with an extension built before the op existed
_op = None
if _READY:
    _op = torch.ops.pyllm.linear_decode.default

    @torch.library.register_fake("pyllm::linear_decode")
    def _linear_decode_fake(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def decode_rows() -> int:
    """Inference calls on 2 to this many rows run the decode kernel (0: this extension has none); for code that
    must follow ``Linear.forward``'s choice without calling it (pyllm.models' one-call decode step)."""
    return DECODE_ROWS if _READY else 0


class Linear(torch.nn.Linear):
    """``torch.nn.Linear``; fp32 inference on 2-16 rows on the CPU runs ``pyllm::linear_decode`` (module docstring)."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        # cheapest tests first: a decode step makes ~50 of these calls. The kernel serves fp32 and hands other
        # dtypes to at::linear itself; it has no autograd, so it runs only with grad mode off.
        n = self.in_features
        if (_READY and not torch.is_grad_enabled() and x.is_cpu and n < x.numel() <= DECODE_ROWS * n
                and backends.requested(self.backend) != "reference"):
            return _op(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
