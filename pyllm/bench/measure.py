"""How things are measured: interleaved timing, peak memory, the machine's own limits, machine info.

GPU: CUDA events around each call, the L2 cache flushed (a 256 MB buffer zeroed) before every call.
CPU: ``torch.utils.benchmark.Timer`` with a fixed thread count. On both, providers of one case are
timed alternately, round by round (rotating who goes first), so load drift hits all of them alike.

Peak memory is the extra memory one call needs beyond its inputs. GPU: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. CPU: in a fresh worker process (``python -m pyllm.bench._memworker``),
the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident
set before the call, with glibc's mmap threshold pinned at 128 KiB so freed tensors go back to the OS.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch



# ------------------------------------------------------------------------------------------ timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


class _L2Flusher:
    def __init__(self):
        self.buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")

    def __call__(self):
        self.buf.zero_()


_flusher = None


def _stable(ts: list[float], min_rounds: int, rel: float) -> bool:
    """Whether the median of ``ts`` is known to ``rel`` (its standard error, ~0.93 IQR / sqrt(n) for a
    normal spread, at most ``rel`` of the median) after at least ``min_rounds`` rounds."""
    if len(ts) < max(4, min_rounds):
        return False
    q = statistics.quantiles(ts, n=4)
    return 0.93 * (q[2] - q[0]) / math.sqrt(len(ts)) <= rel * statistics.median(ts)


def time_interleaved(fns: dict, device: str, *, threads: int, repeats: int, warmup: int, min_run_s: float,
                     max_s: float, warmup_s: float = 0.0, max_rounds: int = 0, stable_rel: float = 0.01,
                     faults: dict | None = None) -> dict[str, list[float]]:
    """{name: [seconds per call, one per round]}.

    Warm-up: at least ``warmup`` calls and ``warmup_s`` seconds per provider (at most ``max_s / 2``).
    GPU: ``repeats`` rounds. CPU: at least ``repeats`` rounds, then more (up to ``max_rounds``; 0 = none
    more) until the median is stable (:func:`_stable` with ``stable_rel``); every provider stops within its
    budget of ``max_s`` seconds (at least 3 rounds, or 1 if one call alone exceeds ``max_s``).

    ``faults`` (CPU): filled with {name: minor page faults per call}, counted around each timed round (the
    process's faults, all threads; a round is ``torch.utils.benchmark.Timer.timeit``: its warm-up calls,
    ``max(number // 100, 2)``, then ``number`` timed ones, all counted). A fresh page costs its zeroing on
    first touch, so a provider whose outputs land on pages the C library just returned to the OS (after its
    own or another provider's frees) pays for them in its time; this figure says when that happened."""
    global _flusher
    plan = {}
    for name, fn in fns.items():
        spent, t1, i = 0.0, None, 0
        while i < max(1, warmup) or spent < min(warmup_s, max_s / 2):
            t1 = _once(fn, device)
            spent, i = spent + t1, i + 1
            if spent > max_s / 2:
                break
        t1 = max(min(t1, _once(fn, device)) if spent < max_s / 2 else t1, 1e-7)
        number = 1 if device == "cuda" else max(1, math.ceil(min_run_s / t1))
        cap = repeats if device == "cuda" else max(repeats, max_rounds)
        budget = 1 if t1 > max_s else max(3, min(cap, int(max_s / (t1 * number))))
        plan[name] = (fn, number, min(repeats, budget), budget)
    names = list(plan)
    times: dict[str, list[float]] = {n: [] for n in names}
    if device == "cuda":
        _flusher = _flusher or _L2Flusher()
        pending = {n: [] for n in names}
        for r in range(max(p[3] for p in plan.values())):
            for n in names[r % len(names):] + names[:r % len(names)]:
                fn, _, _, rounds = plan[n]
                if r >= rounds:
                    continue
                _flusher()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                pending[n].append((start, end))
        torch.cuda.synchronize()
        for n in names:
            times[n] = [s.elapsed_time(e) / 1e3 for s, e in pending[n]]
        return times
    from torch.utils.benchmark import Timer

    timers = {n: Timer(stmt="fn()", globals={"fn": plan[n][0]}, num_threads=threads) for n in names}
    counted = {n: [0, 0] for n in names}  # minor faults, calls
    active = set(names)
    r = 0
    while active:
        for n in names[r % len(names):] + names[:r % len(names)]:
            if n in active:
                number = plan[n][1]
                f0 = _minor_faults()
                times[n].append(timers[n].timeit(number).mean)
                counted[n][0] += _minor_faults() - f0
                counted[n][1] += number + max(number // 100, 2)  # Timer.timeit's warm-up calls, then number
        r += 1
        for n in list(active):
            _, _, least, budget = plan[n]
            if r >= budget or (r >= least and _stable(times[n], least, stable_rel)):
                active.discard(n)
    if faults is not None:
        faults.update({n: f / calls for n, (f, calls) in counted.items()})
    return times


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(ts: list[float]) -> dict:
    """Median with the interquartile range and min/max, in milliseconds."""
    s = sorted(ts)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        q1, q3 = q[0], q[2]
    else:
        q1, q3 = s[0], s[-1]
    ms = lambda x: x * 1e3  # noqa: E731
    return {"median_ms": ms(statistics.median(s)), "q1_ms": ms(q1), "q3_ms": ms(q3), "min_ms": ms(s[0]),
            "max_ms": ms(s[-1]), "n": len(s)}


# ------------------------------------------------------------------------------------------ memory

def peak_memory_cuda(fn) -> int:
    """Extra bytes allocated at the peak of one call, beyond what was allocated before it."""
    fn()  # warm-up: workspaces, lazy init
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


CPU_MEMORY_METHOD = ("peak RSS in a worker process: VmHWM (reset via /proc/self/clear_refs) minus VmRSS before "
                     "the call, after one warm-up call; glibc mmap threshold pinned at 128 KiB")
GPU_MEMORY_METHOD = "torch.cuda.max_memory_allocated() minus memory_allocated() before the call, after a warm-up call"


def peak_memory_cpu(items: list[dict], threads: int, timeout_s: float = 600.0) -> list[dict]:
    """Run the CPU memory worker once over ``items`` ({"case": Case.to_dict(), "provider": name, "seed": int}).

    Returns one {"peak_bytes": int|None, "error": str|None} per item (errors for all if the worker fails).
    """
    if not items:
        return []
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # big blocks come from mmap and return to the OS on free
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    payload = json.dumps({"threads": threads, "items": items})
    try:
        proc = subprocess.run([sys.executable, "-m", "pyllm.bench._memworker"], input=payload, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if len(out) != len(items):
            raise RuntimeError("worker returned a wrong number of results")
        return out
    except Exception as e:  # noqa: BLE001 (memory is a figure, not a reason to lose the timings)
        return [{"peak_bytes": None, "error": f"memory worker failed: {type(e).__name__}: {e}"} for _ in items]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def rss_peak_of(fn) -> int:
    """In this process: peak resident bytes of one call of ``fn`` beyond the resident set before it."""
    fn()  # warm-up; its temporaries are freed by reference counting (gc.collect() costs ~0.5 s with torch loaded)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base)


# ------------------------------------------------------------------------------------ machine limits

MATMUL_SIZES = {"cpu": (256, 512, 1024, 2048), "cuda": (2048, 4096, 8192)}
COPY_STREAM_NUMEL = {"cpu": 1 << 25, "cuda": 1 << 28}  # far beyond the last-level cache


class Limits:
    """The device's own ceilings, measured in this run with the same timer and the run's thread count.

    Peak matmul TFLOP/s per dtype: the best ``torch.mm`` of square sizes ``sizes`` (a tuned GEMM reaches
    the machine's peak at one of them). Memory GB/s: the best of a read (``a.sum()``: one read, as a decode
    step's pass over K and V), STREAM's copy (``dst.copy_(src)``: one read, one write) and add
    (``torch.add(a, b, out=c)``: two reads, one write), each sized to move the case's own bytes and over
    ``stream_numel`` elements, every byte read or written counted. Each figure is the fastest of its timed
    rounds (STREAM's rule: a peak is what the machine did at least once; the providers' rows are medians).
    A provider above either peak is an accounting error (the tool flags it), not a fast kernel.

    Together they give each case its roofline time, ``max(FLOPs / matmul peak, bytes / memory peak)``: no
    provider can be faster, so ``baseline time / roofline time`` is the largest ratio to the baseline that
    this machine allows."""

    def __init__(self, device: str, threads: int, repeats: int = 5, sizes=None, stream_numel: int | None = None,
                 max_s: float = 1.0):
        self.device, self.threads, self.repeats, self.max_s = device, threads, repeats, max_s
        self.sizes = tuple(sizes or MATMUL_SIZES[device])
        self.stream_numel = int(stream_numel or COPY_STREAM_NUMEL[device])
        self.matmul: dict[tuple, float] = {}
        self.read: dict[tuple, float] = {}
        self.copy: dict[tuple, float] = {}
        self.add: dict[tuple, float] = {}

    def _best_s(self, fn) -> float:
        t = time_interleaved({"x": fn}, self.device, threads=self.threads, repeats=self.repeats, warmup=2,
                             min_run_s=0.005, max_s=self.max_s, warmup_s=0.05, max_rounds=self.repeats)["x"]
        return min(t)

    def matmul_tflops(self, dtype, n: int) -> float:
        key = (str(dtype), n)
        if key not in self.matmul:
            a = torch.randn(n, n, device=self.device).to(dtype)
            b = torch.randn(n, n, device=self.device).to(dtype)
            self.matmul[key] = 2.0 * n ** 3 / self._best_s(lambda: torch.mm(a, b)) / 1e12
        return self.matmul[key]

    def matmul_peak(self, dtype) -> tuple[float, int]:
        """(peak TFLOP/s, the GEMM side that reached it) over ``sizes``."""
        return max((self.matmul_tflops(dtype, n), n) for n in self.sizes)

    def read_gbps(self, dtype, numel: int) -> float:
        """GB/s of a.sum() over ``numel`` elements, counting the read."""
        key = (str(dtype), numel)
        if key not in self.read:
            a = torch.randn(numel, device=self.device).to(dtype)
            self.read[key] = numel * a.element_size() / self._best_s(lambda: a.sum()) / 1e9
        return self.read[key]

    def copy_gbps(self, dtype, numel: int) -> float:
        """GB/s of dst.copy_(src) over ``numel`` elements, counting the read and the write."""
        key = (str(dtype), numel)
        if key not in self.copy:
            src = torch.randn(numel, device=self.device).to(dtype)
            dst = torch.empty_like(src)
            nbytes = 2 * src.numel() * src.element_size()
            self.copy[key] = nbytes / self._best_s(lambda: dst.copy_(src)) / 1e9
        return self.copy[key]

    def add_gbps(self, dtype, numel: int) -> float:
        """GB/s of torch.add(a, b, out=c) over ``numel`` elements, counting the two reads and the write."""
        key = (str(dtype), numel)
        if key not in self.add:
            a = torch.randn(numel, device=self.device).to(dtype)
            b, c = torch.randn_like(a), torch.empty_like(a)
            nbytes = 3 * a.numel() * a.element_size()
            self.add[key] = nbytes / self._best_s(lambda: torch.add(a, b, out=c)) / 1e9
        return self.add[key]

    def memory_peak(self, dtype, nbytes: float) -> float:
        """The memory peak for a case that moves ``nbytes``: the best of the read, STREAM's copy and add, each
        sized to move those bytes (a read of ``nbytes``, a copy of half, an add of a third: the same footprint
        in the caches as the case) and each at ``stream_numel`` elements."""
        e = torch.empty((), dtype=dtype).element_size()
        return max(max(f(dtype, max(int(nbytes / (k * e)), 1)), f(dtype, self.stream_numel))
                   for f, k in ((self.read_gbps, 1), (self.copy_gbps, 2), (self.add_gbps, 3)))

    def describe(self) -> str:
        kind = torch.device(self.device).type
        who = f"{self.threads} threads" if kind == "cpu" else f"this {kind} device"
        return (f"measured peaks with {who}: matmul = best torch.mm TFLOP/s over square sizes "
                f"{', '.join(map(str, self.sizes))}; memory = best GB/s of a read (a.sum()), STREAM's copy "
                f"(dst.copy_(src)) and add (torch.add(a, b, out=c)), every byte read or written counted, each moving "
                f"the case's bytes and at {self.stream_numel} elements; each the fastest of its rounds")

    def to_json(self) -> dict:
        return {"method": self.describe(),
                "matmul": [{"dtype": d.replace("torch.", ""), "n": n, "tflops": v}
                           for (d, n), v in self.matmul.items()],
                "read": [{"dtype": d.replace("torch.", ""), "numel": n, "gbps": v} for (d, n), v in self.read.items()],
                "copy": [{"dtype": d.replace("torch.", ""), "numel": n, "gbps": v} for (d, n), v in self.copy.items()],
                "add": [{"dtype": d.replace("torch.", ""), "numel": n, "gbps": v} for (d, n), v in self.add.items()]}


# -------------------------------------------------------------------------------------- machine info

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def machine_info(device: str, threads: int) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(), "os": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "triton": _version("triton"), "numpy": _version("numpy"), "device": device,
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
    }
    try:
        import pyllm

        info["pyllm"] = getattr(pyllm, "__version__", None)
    except Exception:  # noqa: BLE001
        info["pyllm"] = None
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, gpu_capability=f"{p.major}.{p.minor}",
                    gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["gpu_driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except Exception:  # noqa: BLE001
            info["gpu_driver"] = None
    return info
