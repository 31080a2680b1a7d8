"""Who can serve this call? Backend registry, capability declarations and dispatch.

Every op (``pyllm.ops``) describes a call as a small dict (device, dtype, sizes, features); each backend
answers :meth:`Backend.not_supported_reasons` in words, as xformers' dispatch does. ``auto`` takes the
fastest backend with no reasons on the inputs' device; an explicit choice that cannot serve raises,
listing its reasons. No backend ever changes the semantics of an op.

Selection order, first match wins: per call ``backend=``, the innermost :func:`use` context, the
environment variable ``PYLLM_BACKEND``, then ``"auto"``.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Any, Callable, Iterator

import torch

NAMES = ("reference", "cpu", "cuda", "triton")
_CHOICES = NAMES + ("auto",)

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("pyllm_backend", default=None)
_describers: dict[str, Callable[..., dict]] = {}


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _extension_error() -> str | None:
    """Why ``pyllm._C`` (the C++/CUDA kernels) cannot be used, or None when it loaded."""
    from pyllm import _ext

    return _ext.load_error()


class Backend:
    """One way to run the ops. Subclasses declare what they support; ``auto`` ranks them by ``speed``."""

    name: str = ""
    speed: int = 0  # larger = preferred by auto
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    ops: tuple[str, ...] = ("attention", "layer_norm", "rms_norm", "linear_cross_entropy")
    max_head_dim: int = 256

    def unavailable_reason(self) -> str | None:
        """None when this backend can run on this machine at all, else why not."""
        return None

    def not_supported_reasons(self, op: str, call: dict) -> list[str]:
        reasons: list[str] = []
        why = self.unavailable_reason()
        if why:
            return [why]
        if op not in self.ops:
            return [f"{self.name} has no kernel for {op}"]
        device = call["device"]
        if device.type not in self.devices:
            reasons.append(f"device {device.type} not supported (supports {', '.join(self.devices)})")
        if call["dtype"] not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(call['dtype']).replace('torch.', '')} not supported (supports {names})")
        if op == "attention" and call["head_dim"] > self.max_head_dim:
            reasons.append(f"head_dim {call['head_dim']} > {self.max_head_dim}")
        reasons.extend(call.get("unsupported", ()))  # call-specific limits the op layer found
        return reasons


class ReferenceBackend(Backend):
    name = "reference"
    speed = 0
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    max_head_dim = 1 << 30

    def not_supported_reasons(self, op: str, call: dict) -> list[str]:
        return []  # plain PyTorch: serves every call, on every device torch runs on


class CPUBackend(Backend):
    name = "cpu"
    speed = 10
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def unavailable_reason(self) -> str | None:
        err = _extension_error()
        if err:
            return f"pyllm._C did not load ({err})"
        from pyllm import _ext

        if not _ext.has_cpu_kernels():
            return "pyllm._C was built without the CPU kernels (PYLLM_CPU_KERNELS=0)"
        return None


class CUDABackend(Backend):
    name = "cuda"
    speed = 30
    devices = ("cuda",)

    def unavailable_reason(self) -> str | None:
        err = _extension_error()
        if err:
            return f"pyllm._C did not load ({err})"
        from pyllm import _ext

        if not _ext.has_cuda_kernels():
            return "pyllm._C was built without CUDA kernels (CPU-only torch, no nvcc, or PYLLM_SKIP_CUDA_BUILD=1)"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None

    def not_supported_reasons(self, op: str, call: dict) -> list[str]:
        reasons = super().not_supported_reasons(op, call)
        if not reasons and op == "attention":
            if call["dtype"] == torch.float32:
                reasons.append("dtype float32 not supported by the CUDA attention kernel (tensor cores take fp16/bf16)")
            major = torch.cuda.get_device_capability(call["device"])[0]
            if major < 8:
                reasons.append(f"compute capability {major}.x < 8.0 (mma.sync bf16 needs sm_80)")
        return reasons


class TritonBackend(Backend):
    name = "triton"
    speed = 20
    devices = ("cuda", "cpu")

    def unavailable_reason(self) -> str | None:
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if not torch.cuda.is_available() and not _triton_interpreting():
            return "no GPU; set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors (slow)"
        return None

    def not_supported_reasons(self, op: str, call: dict) -> list[str]:
        reasons = super().not_supported_reasons(op, call)
        if not reasons and call["device"].type == "cpu" and not _triton_interpreting():
            reasons.append("CPU tensors run only under TRITON_INTERPRET=1")
        return reasons


_BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CPUBackend(), CUDABackend(), TritonBackend())}


def get(name: str) -> Backend:
    """The backend object called ``name`` (one of ``NAMES``)."""
    return _BACKENDS[_check_name(name, "backend")]


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{what}: expected one of {', '.join(_CHOICES)}, got {name!r}")
    return name


def available() -> list[str]:
    """Names of the backends usable on this machine (the reference always is)."""
    return [n for n, b in _BACKENDS.items() if b.unavailable_reason() is None]


def unavailable() -> dict[str, str]:
    """{name: why it cannot run here} for the backends not in :func:`available`."""
    return {n: r for n, b in _BACKENDS.items() if (r := b.unavailable_reason()) is not None}


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (or ``"auto"``), unless a call passes ``backend=``."""
    token = _current.set(_check_name(name, "pyllm.backends.use"))
    try:
        yield
    finally:
        _current.reset(token)


def requested(backend: str | None = None) -> str:
    """The backend name in force for a call: per call, then :func:`use`, then ``PYLLM_BACKEND``, then auto."""
    if backend is not None:
        return _check_name(backend, "backend")
    ctx = _current.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("PYLLM_BACKEND")
    if env:
        return _check_name(env, "PYLLM_BACKEND")
    return "auto"


def register_op(op: str, describe: Callable[..., dict]) -> None:
    """Called by each op module: ``describe(*args, **kwargs)`` validates a call and returns its description."""
    _describers[op] = describe


def reasons_for(op: str, call: dict) -> dict[str, list[str]]:
    return {name: b.not_supported_reasons(op, call) for name, b in _BACKENDS.items()}


def select(op: str, call: dict, backend: str | None = None) -> str:
    """Pick the backend for one validated call; raise ValueError with reasons if an explicit one cannot serve."""
    name = requested(backend)
    if name != "auto":
        reasons = _BACKENDS[name].not_supported_reasons(op, call)
        if reasons:
            raise ValueError(f"{op}: backend {name!r} cannot serve this call: " + "; ".join(reasons))
        return name
    ranked = sorted(_BACKENDS.values(), key=lambda b: -b.speed)
    for b in ranked:
        if b.name == "triton" and call["device"].type == "cpu":
            continue  # the interpreter is for testing, never the fast choice
        if not b.not_supported_reasons(op, call):
            return b.name
    return "reference"


def explain(op: str, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
    """{backend: [reasons it cannot serve this call]} for ``op`` called with these arguments; [] = it can.

    ``op`` is ``"attention"``, ``"layer_norm"``, ``"rms_norm"``, ``"linear_cross_entropy"`` or
    ``"scaled_dot_product_attention"``;
    the arguments are those of the public function of that name.
    """
    import pyllm.ops  # noqa: F401  (registers the describers)

    if op not in _describers:
        raise ValueError(f"explain: op must be one of {', '.join(sorted(_describers))}, got {op!r}")
    kind, call = _describers[op](*args, **kwargs)
    return reasons_for(kind, call)
