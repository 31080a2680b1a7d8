"""What each backend can serve: one capability table per backend, written once.

:mod:`pyllm.backends` builds its dispatch and ``explain`` reasons from these tables, the Triton launchers
read their limits here, and ``pyllm info`` prints them (:func:`table`). The C++ and CUDA kernels keep
their own compile-time constants (e.g. ``kMaxHeadDim``) only as guards against out-of-bounds access;
the op layer (``pyllm.ops``) rejects bad input with a clear message before any kernel is called.

Plain data (dtype names, not torch objects): importing this module imports nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OPS = ("attention", "layer_norm", "rms_norm", "rotary", "linear_cross_entropy", "gelu_tanh")
_HALF_AND_FP32 = ("float32", "float16", "bfloat16")
ATTENTION_FEATURES = ("dropout", "window", "softcap", "alibi", "attn_bias", "varlen")


@dataclass(frozen=True)
class Capabilities:
    """devices: tensor device types; dtypes: input dtypes of every op; op_dtypes: narrower per-op dtypes;
    max_head_dim: attention head_dim limit (None = any); min_compute_capability: CUDA (major, minor)
    needed by ``capability_ops``; notes: what the table cannot say as data, shown by ``pyllm info``."""

    devices: tuple[str, ...]
    dtypes: tuple[str, ...] = _HALF_AND_FP32
    ops: tuple[str, ...] = OPS
    op_dtypes: dict = field(default_factory=dict)
    max_head_dim: int | None = 256
    min_compute_capability: tuple[int, int] | None = None
    capability_ops: tuple[str, ...] = ()
    notes: str = ""
    # FlashAttention features the attention kernels implement (pyllm.ops.attention.Extras.features + "varlen")
    attention_features: tuple[str, ...] = ()


REFERENCE = Capabilities(devices=("cpu", "cuda", "mps", "xpu", "meta"), dtypes=_HALF_AND_FP32 + ("float64",),
                         max_head_dim=None, notes="plain PyTorch: serves every call; O(N^2) attention memory")
CPU = Capabilities(devices=("cpu",), dtypes=_HALF_AND_FP32 + ("float64",), notes="C++ kernels in pyllm._C",
                   attention_features=ATTENTION_FEATURES)
# attn_bias is not in the CUDA kernels (auto takes triton or cpu for it; explain says so); varlen runs the
# feature kernels once per packed sequence (pyllm.ops.attention.attention_varlen)
CUDA = Capabilities(devices=("cuda",), op_dtypes={"attention": ("float16", "bfloat16")},
                    min_compute_capability=(8, 0), capability_ops=("attention",),
                    notes="CUDA C++ kernels in pyllm._C; attention on tensor cores (mma.sync bf16 needs sm_80)",
                    attention_features=("dropout", "window", "softcap", "alibi", "varlen"))
TRITON = Capabilities(devices=("cuda", "cpu"), attention_features=ATTENTION_FEATURES,
                      notes="CPU tensors only under TRITON_INTERPRET=1 (tests), never chosen by auto there")

TABLES = {"reference": REFERENCE, "cpu": CPU, "cuda": CUDA, "triton": TRITON}


def table() -> str:
    """The tables as text, one line per backend (for ``pyllm info`` and the docs)."""
    lines = []
    for name, c in TABLES.items():
        dt = ", ".join(c.dtypes) + "".join(f"; {op}: {', '.join(d)}" for op, d in c.op_dtypes.items())
        hd = "any" if c.max_head_dim is None else f"1-{c.max_head_dim}"
        cc = f", sm_{c.min_compute_capability[0]}{c.min_compute_capability[1]}+ for {', '.join(c.capability_ops)}" \
            if c.min_compute_capability else ""
        feats = f"; attention features: {', '.join(c.attention_features)}" if c.attention_features else ""
        lines.append(f"{name:<10} devices {', '.join(c.devices)}; dtypes {dt}; head_dim {hd}{cc}{feats}. {c.notes}")
    return "\n".join(lines)
