"""Who can serve this call? Backend registry, capability declarations and dispatch.

Every op (``pyllm.ops``) describes a call as a small dict (device, dtype, sizes, features); each backend
answers :meth:`Backend.not_supported_reasons` in words, as xformers' dispatch does. ``auto`` takes the
fastest backend with no reasons on the inputs' device; an explicit choice that cannot serve raises,
listing its reasons. No backend ever changes the semantics of an op.

Selection order, first match wins: per call ``backend=``, the innermost :func:`use` context, the
environment variable ``PYLLM_BACKEND``, then ``"auto"``. The :func:`use` state is a plain module global
(process-wide, like ``torch.backends`` flags), so ``torch.compile(fullgraph=True)`` traces the default
choice and guards on it.

What each backend supports is declared once, in :mod:`pyllm.capabilities`. Which GPU backends have passed
``benchmarks/gpu_check.sh`` on real hardware is recorded in ``pyllm/verified.json``: until the cuda
backend has a record for an op, ``auto`` on CUDA tensors takes triton before it (:func:`auto_order`).

Imports flow one way: the ops register how to describe a call (:func:`register_op`); this module never
imports them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from typing import Any, Callable, Iterator

import torch

from pyllm import capabilities
from pyllm.kernels import interpreting

NAMES = ("reference", "cpu", "cuda", "triton")
_CHOICES = NAMES + ("auto",)

_current: str | None = None  # set by use(); a module global so Dynamo can trace and guard on it
_describers: dict[str, Callable[..., dict]] = {}


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_VERIFIED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verified.json")


def _load_verified(path: str = _VERIFIED_FILE) -> list[dict]:
    """The records of ``pyllm/verified.json``: which backend passed which ops on which GPU (see the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)["records"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a missing or unreadable record trusts nothing: auto keeps triton first on CUDA
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("backend"), str)
            and isinstance(r.get("ops"), list)]


VERIFIED: list[dict] = _load_verified()


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# The extension's state is read through these helpers, never by an import statement in dispatch code: under
# torch.compile, dynamo calls them once at trace time and treats the answer as a constant
# (assume_constant_result), so tracing never executes ``from pyllm import _ext``. Torch 2.11's dynamo refuses
# that import inside a traced function ("Bad import result": the package ``pyllm`` is a ModuleType subclass,
# see pyllm._lazy; seen on an H200, 2026-11-30), where torch 2.13's accepts it.
@torch.compiler.assume_constant_result
def _extension_error() -> str | None:
    """Why ``pyllm._C`` (the C++/CUDA kernels) cannot be used, or None when it loaded."""
    from pyllm import _ext

    return _ext.load_error()


@torch.compiler.assume_constant_result
def _ext_has_kernel(op: str, dispatch_key: str) -> bool:
    from pyllm import _ext

    return _ext.has_kernel(op, dispatch_key)


@torch.compiler.assume_constant_result
def _ext_has_kernels(dispatch_key: str) -> bool:
    """Whether ``pyllm._C`` was built with its ``dispatch_key`` ("CPU" / "CUDA") kernels."""
    from pyllm import _ext

    return _ext.has_cpu_kernels() if dispatch_key == "CPU" else _ext.has_cuda_kernels()


class Backend:
    """One way to run the ops, with the capability table of :mod:`pyllm.capabilities` named ``name``;
    ``auto`` ranks backends by ``speed`` (see :func:`auto_order`)."""

    name: str = ""
    speed: int = 0  # larger = preferred by auto
    dispatch_key: str | None = None  # the C++ backends: whose kernels in pyllm._C serve them

    def __init__(self) -> None:
        caps = capabilities.TABLES[self.name]
        self.caps = caps
        self.devices, self.ops, self.max_head_dim = caps.devices, caps.ops, caps.max_head_dim
        self.dtypes = tuple(getattr(torch, d) for d in caps.dtypes)
        self.op_dtypes = {op: tuple(getattr(torch, d) for d in ds) for op, ds in caps.op_dtypes.items()}
        # FlashAttention features the attention kernels implement (pyllm.ops.attention.Extras.features, "varlen")
        self.attention_features = frozenset(caps.attention_features)

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
        if self.dispatch_key is not None and not _ext_has_kernel(op, self.dispatch_key):
            return [f"pyllm._C has no {self.dispatch_key} kernel for {op} (built before the op existed: rebuild)"]
        device = call["device"]
        if device.type not in self.devices:
            reasons.append(f"device {device.type} not supported (supports {', '.join(self.devices)})")
        dtypes = self.op_dtypes.get(op, self.dtypes)
        if call["dtype"] not in dtypes:
            got = _dtype_names([call["dtype"]])
            reasons.append(f"dtype {got} not supported by the {self.name} {op} kernel (supports {_dtype_names(dtypes)})")
        if op == "attention" and self.max_head_dim is not None and call["head_dim"] > self.max_head_dim:
            reasons.append(f"head_dim {call['head_dim']} > {self.max_head_dim}")
        reasons.extend(call.get("unsupported", ()))  # call-specific limits the op layer found
        missing = [f for f in call.get("features", ()) if f not in self.attention_features]
        if missing:
            reasons.append(f"{', '.join(missing)} not implemented in the {self.name} kernels")
        elif call.get("features") and self.dispatch_key and not _ext_has_kernel("attention_ext", self.dispatch_key):
            reasons.append(f"pyllm._C has no {self.dispatch_key} kernel for attention_ext_fwd (built before the "
                           "features existed: rebuild)")
        return reasons


class ReferenceBackend(Backend):
    name = "reference"
    speed = 0

    def not_supported_reasons(self, op: str, call: dict) -> list[str]:
        return []  # plain PyTorch: serves every call, on every device torch runs on


class CPUBackend(Backend):
    name = "cpu"
    speed = 10
    dispatch_key = "CPU"

    def unavailable_reason(self) -> str | None:
        err = _extension_error()
        if err:
            return f"pyllm._C did not load ({err})"
        if not _ext_has_kernels("CPU"):
            return "pyllm._C was built without the CPU kernels (PYLLM_CPU_KERNELS=0)"
        return None


class CUDABackend(Backend):
    name = "cuda"
    speed = 30
    dispatch_key = "CUDA"

    def unavailable_reason(self) -> str | None:
        err = _extension_error()
        if err:
            return f"pyllm._C did not load ({err})"
        if not _ext_has_kernels("CUDA"):
            return "pyllm._C was built without CUDA kernels (CPU-only torch, no nvcc, or PYLLM_SKIP_CUDA_BUILD=1)"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None

    def not_supported_reasons(self, op: str, call: dict) -> list[str]:
        reasons = super().not_supported_reasons(op, call)
        need = self.caps.min_compute_capability
        if not reasons and need and op in self.caps.capability_ops:
            have = torch.cuda.get_device_capability(call["device"])
            if tuple(have) < need:
                reasons.append(f"compute capability {have[0]}.{have[1]} < {need[0]}.{need[1]} ({self.caps.notes})")
        return reasons


class TritonBackend(Backend):
    name = "triton"
    speed = 20

    def unavailable_reason(self) -> str | None:
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if not torch.cuda.is_available() and not interpreting():
            return "no GPU; set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors (slow)"
        return None

    def not_supported_reasons(self, op: str, call: dict) -> list[str]:
        reasons = super().not_supported_reasons(op, call)
        if not reasons and call["device"].type == "cpu" and not interpreting():
            reasons.append("CPU tensors run only under TRITON_INTERPRET=1")
        return reasons


_BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), CPUBackend(), CUDABackend(), TritonBackend())}


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
    """Run the ops inside the block on backend ``name`` (or ``"auto"``), unless a call passes ``backend=``.

    The choice is process-wide while the block runs (other threads see it too), as ``torch.backends`` flags
    are; that is what lets ``torch.compile`` trace it."""
    global _current
    saved, _current = _current, _check_name(name, "pyllm.backends.use")
    try:
        yield
    finally:
        _current = saved


def requested(backend: str | None = None) -> str:
    """The backend name in force for a call: per call, then :func:`use`, then ``PYLLM_BACKEND``, then auto."""
    if backend is not None:
        return _check_name(backend, "backend")
    if _current is not None:
        return _current
    env = os.environ.get("PYLLM_BACKEND")
    if env:
        return _check_name(env, "PYLLM_BACKEND")
    return "auto"


def register_op(op: str, describe: Callable[..., dict]) -> None:
    """Called by each op module: ``describe(*args, **kwargs)`` validates a call and returns its description."""
    _describers[op] = describe


def reasons_for(op: str, call: dict) -> dict[str, list[str]]:
    return {name: b.not_supported_reasons(op, call) for name, b in _BACKENDS.items()}


_selected: dict[tuple, str] = {}  # select's answers per (op, requested name, call, TRITON_INTERPRET): small calls


_PLAIN = (str, int, float, bool, type(None), torch.device, torch.dtype)


def _call_key(call: dict) -> tuple | None:
    """The call description as a cache key, or None when it holds anything but plain values (never a tensor:
    the cache must not keep one alive)."""
    key = []
    for k, v in call.items():
        if isinstance(v, (list, tuple)):
            if not all(isinstance(e, str) for e in v):
                return None
            v = tuple(v)
        elif not isinstance(v, _PLAIN):
            return None
        key.append((k, v))
    return tuple(key)


def select(op: str, call: dict, backend: str | None = None) -> str:
    """Pick the backend for one validated call; raise ValueError with reasons if an explicit one cannot serve.

    Answers are cached per (op, requested backend, the call's description, ``TRITON_INTERPRET``): the call
    description holds everything the choice depends on (device, dtypes, sizes, the op layer's limits)."""
    name = requested(backend)
    # Eager calls only: under torch.compile the choice is traced once per graph, and a dict lookup traced there
    # would guard on the cache's contents (a first eager call adding the key later forces a recompile).
    ck = None if torch.compiler.is_compiling() else _call_key(call)
    if ck is None:
        return _select(op, call, name)
    key = (op, name, os.environ.get("TRITON_INTERPRET"), ck)
    hit = _selected.get(key)
    if hit is not None:
        return hit
    if len(_selected) > 1024:
        _selected.clear()
    _selected[key] = chosen = _select(op, call, name)
    return chosen


def _select(op: str, call: dict, name: str) -> str:
    if name != "auto":
        reasons = _BACKENDS[name].not_supported_reasons(op, call)
        if reasons:
            raise ValueError(f"{op}: backend {name!r} cannot serve this call: " + "; ".join(reasons))
        return name
    for b in auto_order(op, call):
        if not _BACKENDS[b].not_supported_reasons(op, call):
            return b
    return "reference"


def verified_records(backend: str, op: str | None = None, records: list[dict] | None = None) -> list[dict]:
    """The records of ``pyllm/verified.json`` (or ``records``) in which ``backend`` passed (``op``) on a GPU."""
    records = VERIFIED if records is None else records
    return [r for r in records if r.get("backend") == backend and (op is None or op in r.get("ops", ()))]


def auto_order(op: str, call: dict, records: list[dict] | None = None) -> list[str]:
    """The backends ``auto`` tries for ``call``, in order: by speed, except that on CUDA tensors the cuda
    backend goes after triton until ``pyllm/verified.json`` (or ``records``) holds a GPU run in which it
    passed ``op``; on CPU tensors triton (the interpreter, for testing) is never tried."""
    order = [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.speed)]
    device = call["device"].type
    if device == "cpu":
        order.remove("triton")
    elif device == "cuda" and not verified_records("cuda", op, records):
        order.remove("cuda")
        order.insert(order.index("triton") + 1, "cuda")
    return order


def verification(name: str, records: list[dict] | None = None) -> str:
    """One line: whether backend ``name`` has been verified on a GPU, and where."""
    if name == "reference":
        return "reference: plain PyTorch, the oracle the kernels are checked against (nothing to verify on a GPU)"
    if name == "cpu":
        return "cpu: CPU kernels, checked by the test suite and `pyllm check` (no GPU involved)"
    recs = verified_records(name, records=records)
    if not recs:
        return (f"{name}: not yet verified on a GPU (no benchmarks/gpu_check.sh run has passed every test file "
                "of one of its ops; README's GPU section says what has run)")
    where = "; ".join(f"{', '.join(r['ops'])} on {r.get('gpu', '?')} (sm {r.get('capability', '?')}), "
                      f"{r.get('date', '?')}, commit {str(r.get('commit', '?'))[:12]}" for r in recs)
    return f"{name}: verified on a GPU: {where}"


class Explanation(dict):
    """{backend: [reasons it cannot serve this call]} ([] = it can), plus ``auto``: the backend auto picks,
    and ``verified``: {backend: whether it has been verified on a GPU, and where}."""

    def __init__(self, reasons: dict[str, list[str]], auto: str, verified: dict[str, str]):
        super().__init__(reasons)
        self.auto, self.verified = auto, verified

    def __str__(self) -> str:
        lines = [f"{n}: " + ("can serve" if not r else "cannot: " + "; ".join(r)) for n, r in self.items()]
        return "\n".join(lines + [f"auto picks: {self.auto}"] + list(self.verified.values()))


def explain(op: str, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
    """{backend: [reasons it cannot serve this call]} for ``op`` called with these arguments; [] = it can.

    ``op`` is ``"attention"``, ``"layer_norm"``, ``"rms_norm"``, ``"rotary"``, ``"linear_cross_entropy"``,
    ``"gelu"`` or ``"scaled_dot_product_attention"``;
    the arguments are those of the public function of that name. The result (an :class:`Explanation`)
    also says which backend ``auto`` picks and, per backend, whether it has been verified on a GPU.
    """
    if op not in _describers:  # the ops register themselves when pyllm is imported
        raise ValueError(f"explain: op must be one of {', '.join(sorted(_describers))}, got {op!r}")
    kind, call = _describers[op](*args, **kwargs)
    return Explanation(reasons_for(kind, call), select(kind, call, "auto"),
                       {n: verification(n) for n in NAMES})
