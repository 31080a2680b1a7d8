"""pyllm: fused attention and LayerNorm/RMSNorm kernels (C++ CPU, CUDA, Triton) under a thin Transformer API.

Ops: :func:`attention`, :func:`attention_varlen`, :func:`attention_probs`, :func:`scaled_dot_product_attention`,
:func:`layer_norm`, :func:`rms_norm`, :func:`rotary`,
:func:`linear_cross_entropy`, :func:`gelu`.
Backends: :mod:`pyllm.backends`. Modules: :mod:`pyllm.nn`. Models: :mod:`pyllm.models`.
Each name loads its module (and torch) on first use (:mod:`pyllm._lazy`), so ``pyllm --help`` is fast.
"""
from pyllm._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_varlen", "attention_probs", "scaled_dot_product_attention", "layer_norm", "rms_norm",
    "rotary", "linear_cross_entropy", "gelu",
    "backends", "reference", "nn", "check", "__version__",
]

lazy_exports(__name__, {
    "attention": "pyllm.ops:attention", "scaled_dot_product_attention": "pyllm.ops:scaled_dot_product_attention",
    "attention_varlen": "pyllm.ops:attention_varlen", "attention_probs": "pyllm.ops:attention_probs",
    "layer_norm": "pyllm.ops:layer_norm", "rms_norm": "pyllm.ops:rms_norm", "rotary": "pyllm.ops:rotary",
    "linear_cross_entropy": "pyllm.ops:linear_cross_entropy", "gelu": "pyllm.ops:gelu",
    "backends": "pyllm.backends", "reference": "pyllm.reference", "nn": "pyllm.nn", "check": "pyllm.check:check",
}, needs={"backends": "pyllm.ops"})  # backends.explain needs the ops' call describers, which they register
