"""One decode step of a pre-norm decoder stack (pyllm.models' GPT and Llama blocks) as one C++ call, for
generate()'s loop: ``pyllm._C.decode_stack_fast`` (csrc/small_calls.cpp, its argument contract there) strings
together the calls the blocks' decode methods make -- the norms', rotary's and attention's C++ ops,
``pyllm.nn.Linear``'s inference rule, the activation, the KV-cache writes -- in the same order with the same
arguments, so the results are the same bits, without Python between them.

Internal to pyllm.models (``block.StackPlan`` builds the arguments once per generate() call). Like the op layer's
other small-call fast paths (:mod:`pyllm.ops._fast`) it stands for the backend choice "auto" or "cpu" on CPU
tensors only, and answers None, having written nothing, for any call it does not take.
"""
from __future__ import annotations

from pyllm import backends
from pyllm.ops import _fast

_FAST = _fast.load("decode_stack_fast", ("layer_norm", "rms_norm", "attention", "rotary", "gelu_tanh"))
BACKENDS = _fast.CPU_CHOICES  # the modules' backend= values the step stands for


def available() -> bool:
    """Whether the extension has the C++ step (an extension built before it did not)."""
    return _FAST is not None


def decode_stack(x, layers, final_norm, k_cache, v_cache, start: int, key_padding_mask, cos, sin, spec):
    """x (B, N, C) embedded tokens -> the stack's output (B, N, C), k_cache / v_cache written at positions
    start..start+N-1; or None (nothing written) where the C++ step does not take the call (the backend in force is
    not auto / cpu, an argument it does not recognize). Arguments as ``decode_stack_fast``'s (csrc/small_calls.cpp)."""
    if _FAST is None or backends._current not in _fast.CPU_CHOICES:
        return None
    return _FAST(x, layers, final_norm, k_cache, v_cache, start, key_padding_mask, cos, sin, spec)
