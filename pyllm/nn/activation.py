"""GELU on pyllm's fused op (a subclass of torch's ``nn.GELU``: same constructor and repr)."""
from __future__ import annotations

import torch
from torch import Tensor

from pyllm.ops import gelu


class GELU(torch.nn.GELU):
    """``torch.nn.GELU``; ``approximate="tanh"`` (GPT-2's gelu_new) runs pyllm's fused kernel, the exact form
    is torch's own (see :func:`pyllm.gelu`)."""

    def __init__(self, approximate: str = "none", *, backend: str | None = None):
        super().__init__(approximate)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x, self.approximate, backend=self.backend)
