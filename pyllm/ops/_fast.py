"""Small calls (issue 15): the C++ fast paths of the op layer (``pyllm._C.layer_norm_fast`` / ``attention_fast`` /
``rotary_fast``, csrc/small_calls.cpp; ``decode_stack_fast``, a whole decode step of the models' blocks, is loaded
by pyllm.ops.decode_stack).

A norm, attention or rotary call on CPU tensors with the default feature arguments, parameters in the input's dtype (or
float32) and the backend in force ``auto`` or ``cpu`` is recognized in C++ and goes straight to the C++ op; the
function returns None for every other call, and the Python op layer then takes its full path (validation and its
error messages, dtype harmonization, backend choice, the reference). What the cpu backend serves is configured
here from :mod:`pyllm.capabilities`, so the table stays the one place that says it. Under ``torch.compile`` the
op layer never calls these (Dynamo traces the torch.ops path).
"""
from __future__ import annotations

from typing import Callable

# per-call ``backend=`` and ``backends.use`` values the fast paths stand for (on CPU tensors auto picks cpu
# whenever the cpu backend can serve, and the fast paths take only calls it can serve)
CPU_CHOICES = (None, "auto", "cpu")


def load(fn_name: str, ops: tuple[str, ...]) -> Callable | None:
    """``pyllm._C.<fn_name>`` configured for ``ops``, or None when the extension, its CPU kernels for ``ops``
    or the function itself (an extension built before it existed) are missing."""
    from pyllm import _ext, backends, capabilities

    if _ext.load_error() is not None or backends._BACKENDS["cpu"].unavailable_reason() is not None:
        return None
    from pyllm import _C

    fn, configure = getattr(_C, fn_name, None), getattr(_C, "_small_calls_configure", None)
    if fn is None or configure is None or not all(_ext.has_kernel(op, "CPU") for op in ops):
        return None
    caps = capabilities.CPU
    for op in ops:
        configure(op, tuple(caps.op_dtypes.get(op, caps.dtypes)), caps.max_head_dim)
    return fn
