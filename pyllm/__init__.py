"""pyllm: fused attention and LayerNorm/RMSNorm kernels (C++ CPU, CUDA, Triton) under a thin Transformer API.

Ops: :func:`attention`, :func:`scaled_dot_product_attention`, :func:`layer_norm`, :func:`rms_norm`,
:func:`linear_cross_entropy`.
Backends: :mod:`pyllm.backends`. Modules: :mod:`pyllm.nn`. Models: :mod:`pyllm.models`.
"""
from pyllm import backends, reference
from pyllm.ops import attention, layer_norm, linear_cross_entropy, rms_norm, scaled_dot_product_attention
from pyllm import nn
from pyllm.check import check

__version__ = "0.1.0"

__all__ = [
    "attention", "scaled_dot_product_attention", "layer_norm", "rms_norm", "linear_cross_entropy",
    "backends", "reference", "nn", "check", "__version__",
]
