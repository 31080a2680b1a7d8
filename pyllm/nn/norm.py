"""LayerNorm and RMSNorm modules on pyllm's fused ops (subclasses of torch's: same state_dict)."""
from __future__ import annotations

import torch
from torch import Tensor

from pyllm.ops import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on pyllm's kernel. ``forward(x, residual=r)`` returns ``(norm(x + r), x + r)``."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on pyllm's kernel. ``forward(x, residual=r)`` returns ``(norm(x + r), x + r)``."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, residual=residual, backend=self.backend)
