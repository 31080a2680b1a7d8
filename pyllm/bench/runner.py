"""Run a benchmark: check every provider, time the ones that are right, measure memory, derive figures.

:func:`run` takes explicit cases; :func:`bench` builds them from presets or user shapes first. Both
return the report as a plain dict (what :func:`pyllm.bench.report.write_json` writes).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import check as chk
from .measure import (CPU_MEMORY_METHOD, GPU_MEMORY_METHOD, Limits, machine_info, peak_memory_cpu,
                      peak_memory_cuda, summarize, time_interleaved)
from .providers import BASELINES, Provider, select
from .spec import BenchError, Case, build_cases, bytes_moved, flops
from .train_step import check_step
from .work import build_call, build_timed, make_inputs

SCHEMA = "pyllm-bench/1"
FLOPS_METHOD = ("FlashAttention's 4*H*D per (query, key) pair, counting only the pairs the mask leaves (causal, "
                "padding): every provider is credited with the same useful work; x2.5 bwd, x3.5 fwd+bwd")
BYTES_METHOD = "minimal bytes: each input read once (attention: the real keys and values only), each output written once"

# Timing settings per preset: at least `repeats` rounds (CPU: more, up to `max_rounds`, until the median is
# stable), at least `warmup` calls and `warmup_s` seconds of warm-up, CPU: shortest timed run (s), per provider
# per case budget (s). Limits: the GEMM sizes tried for the matmul peak, the STREAM copy / add elements.
_CPU_DEFAULT = dict(repeats=10, warmup=2, warmup_s=0.2, min_run_s=0.01, max_s=2.0, max_rounds=60)
SETTINGS = {
    "cpu": {"quick": dict(repeats=5, warmup=1, warmup_s=0.01, min_run_s=0.002, max_s=0.15, max_rounds=10),
            "default": _CPU_DEFAULT, "decode": _CPU_DEFAULT, "small": _CPU_DEFAULT, "sweep": _CPU_DEFAULT,
            "long": dict(repeats=10, warmup=3, warmup_s=0.5, min_run_s=0.02, max_s=10.0, max_rounds=100)},
    "cuda": {"quick": dict(repeats=10, warmup=3, min_run_s=0.0, max_s=0.5),
             "default": dict(repeats=30, warmup=5, min_run_s=0.0, max_s=2.0),
             "decode": dict(repeats=30, warmup=5, min_run_s=0.0, max_s=2.0),
             "small": dict(repeats=30, warmup=5, min_run_s=0.0, max_s=2.0),
             "sweep": dict(repeats=30, warmup=5, min_run_s=0.0, max_s=2.0),
             "long": dict(repeats=30, warmup=5, min_run_s=0.0, max_s=5.0)},
}
LIMITS = {"cpu": {"quick": dict(sizes=(128, 256, 512), stream_numel=1 << 22, max_s=0.3)},
          "cuda": {"quick": dict(sizes=(1024, 2048, 4096), stream_numel=1 << 26, max_s=0.5)}}


@dataclass
class Settings:
    """How one run measures: device, preset, CPU threads, timing (repeats, warmup, warmup_s, min_run_s, max_s,
    max_rounds; see ``SETTINGS``), whether to measure peak memory, the input seed, and where progress lines go."""

    device: str
    preset: str
    threads: int
    timing: dict
    memory: bool
    seed: int
    log: Callable[[str], None]


def _mem_budget(device: str) -> int:
    """Bytes a quadratic-memory provider may use before it is skipped ("as far as it fits sensibly")."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 16 << 30
    return min(4 << 30, avail // 4)


def _quadratic_bytes(case: Case) -> int:
    B, Hq, _, Nq, Nk, _ = case.dims
    return B * Hq * Nq * Nk * max(case.elem_bytes, 4) * (2 if case.mode == "fwd" else 5)


def bench(ops=None, *, preset="quick", device="cpu", shapes=(), dtypes=None, modes=None, causal="preset",
          padding=False, residual="preset", providers=None, **kw) -> dict:
    """Build cases from a preset (or parsed user shapes) and :func:`run` them. See ``pyllm bench --help``."""
    from .spec import parse_modes, parse_ops

    ops = parse_ops(ops)
    cases = build_cases(ops, parse_modes(modes) if modes else None, dtypes, preset, device, shapes, causal, padding, residual)
    return run(cases, providers=providers, device=device, preset=preset, **kw)


def run(cases: list[Case], *, providers=None, device: str = "cpu", preset: str = "quick", threads: int | None = None,
        repeats: int | None = None, warmup: int | None = None, min_run_s: float | None = None,
        max_s: float | None = None, memory: bool = True, seed: int = 0,
        log: Callable[[str], None] | None = None, extra_providers: list[Provider] = ()) -> dict:
    """Check, time and measure every (case, provider); returns the report dict (schema ``pyllm-bench/1``).

    ``providers``: names or groups (None = all known); ``extra_providers``: Provider objects to add
    (tests use this to plant a wrong one). Timing settings default to the preset's (``SETTINGS``).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if device not in ("cpu", "cuda"):
        raise BenchError(f"--device: expected cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch.cuda.is_available() is False on this machine")
    if not cases:
        raise BenchError("nothing to run: no cases")
    threads = int(threads or torch.get_num_threads())
    if threads <= 0:
        raise BenchError(f"--threads: expected a positive integer, got {threads}")
    st = dict(SETTINGS[device].get(preset, SETTINGS[device]["quick"]))
    for k, v in (("repeats", repeats), ("warmup", warmup), ("min_run_s", min_run_s), ("max_s", max_s)):
        if v is not None:
            if v < 0 or (k == "repeats" and v < 1):
                raise BenchError(f"--{k.replace('_', '-')}: expected a positive number, got {v}")
            st[k] = v
    ops = list(dict.fromkeys(c.op for c in cases))
    usable, table = select(providers, ops, device)
    for p in extra_providers:
        usable.append(p)
        table[p.name] = {"kind": p.kind, "status": "ok", "reason": "", "ops": list(p.ops), "what": p.describe}
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # restored below: a library call must not change the caller's setting
    try:
        return _run(cases, usable, table, ops, Settings(device, preset, threads, st, memory, seed, log))
    finally:
        torch.set_num_threads(saved_threads)


def _run(cases, usable, table, ops, s: Settings) -> dict:
    device, threads, seed, log, st = s.device, s.threads, s.seed, s.log, s.timing
    limits = Limits(device, threads, **LIMITS[device].get(s.preset, {}))
    t_start = time.time()
    results, mem_queue = [], []
    groups: dict[tuple, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.key(), []).append(c)
    for gi, group in enumerate(groups.values()):
        c0 = group[0]
        modes = ", ".join(c.mode for c in group)
        log(f"{time.time() - t_start:6.1f}s [{gi + 1}/{len(groups)}] {c0.op} {c0.label()} {c0.dtype}: {modes}")
        provs = [p for p in usable if c0.op in p.ops]
        inputs = make_inputs(c0, device, seed) if c0.op != "train_step" else None
        verdicts = _check_group(c0, provs, device, seed, inputs)
        for case in group:
            results += _measure_case(case, provs, verdicts, inputs, s, limits, mem_queue)
        del inputs
    if mem_queue:
        log(f"{time.time() - t_start:6.1f}s measuring peak memory of {len(mem_queue)} calls in a worker process")
        items = [{"case": r["_case"].to_dict(), "provider": r["provider"], "seed": seed} for r in mem_queue]
        for r, m in zip(mem_queue, peak_memory_cpu(items, threads)):
            r["peak_bytes"], r["memory_error"] = m["peak_bytes"], m["error"]
    _ratios(results)
    for r in results:
        r.pop("_case", None)
    return {
        "schema": SCHEMA, "machine": machine_info(device, threads),
        "settings": {"preset": s.preset, "device": device, "threads": threads, **st, "seed": seed,
                     "timer": ("CUDA events per call, L2 flushed (256 MB buffer zeroed) before each, providers "
                               "interleaved" if device == "cuda" else
                               f"torch.utils.benchmark.Timer(num_threads={threads}), providers interleaved"),
                     "memory": (GPU_MEMORY_METHOD if device == "cuda" else CPU_MEMORY_METHOD) if s.memory else None,
                     "flops": FLOPS_METHOD, "bytes": BYTES_METHOD, "limits": limits.describe(),
                     "check": ("max|provider - ref| <= 2*max(|torch math in the dtype - ref|, |baseline op - ref|) "
                               "+ 1e-5 (+ floor*max|ref| for torch and peers), ref in fp64 for fp32, fp32 for "
                               "fp16/bf16, per output and gradient (pyllm.accuracy)"),
                     "elapsed_s": round(time.time() - t_start, 2)},
        "providers": table, "baselines": {op: BASELINES[op] for op in ops}, "limits": limits.to_json(),
        "results": results,
    }


def _check_group(c0: Case, provs: list[Provider], device: str, seed: int, full_inputs: dict | None) -> dict:
    """{provider name: {"status", "reason", "check": {...}}} for the mode-less case ``c0``."""
    out = {}
    if c0.op == "train_step":
        for p in provs:
            try:
                v = check_step(c0, p, device, seed)
                out[p.name] = {"status": "ok", "reason": "", "check": v}
            except Exception as e:  # noqa: BLE001
                out[p.name] = {"status": "error", "reason": f"{type(e).__name__}: {e}", "check": None}
        return out
    cc = chk.check_case(c0, device)
    inputs = make_inputs(cc, device, seed) if cc != c0 else full_inputs
    ref = None
    for p in sorted(provs, key=lambda p: p.name != BASELINES[c0.op]):  # the baseline first: its error is a bar
        why = p.unsupported(c0, full_inputs)
        if why:
            out[p.name] = {"status": "unsupported", "reason": why, "check": None}
            continue
        if ref is None:
            ref = chk.reference(cc, inputs)
        if p.name == BASELINES[c0.op]:
            try:
                base = chk.run_provider(build_call(cc, p, inputs))
                if not isinstance(base[1], str):
                    ref["base"] = base
            except Exception:  # noqa: BLE001 (reported below when run again)
                pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outs, grads = chk.run_provider(build_call(cc, p, inputs))
                v = chk.verdict(cc, ref, outs, grads, peer=p.kind != "pyllm")
                v["check_label"] = cc.label()
                out[p.name] = {"status": "ok", "reason": "", "check": v}
            except Exception as e:  # noqa: BLE001 (a provider that raises is reported, not fatal)
                why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                # torch explains in warnings why an SDPA backend refused ("Flash attention does not support ...")
                notes = [str(w.message).splitlines()[0][:200] for w in caught]
                if notes:
                    why += " (" + "; ".join(dict.fromkeys(notes)) + ")"
                out[p.name] = {"status": "unsupported" if p.refuses(e) else "error", "reason": why, "check": None}
    return out


def _jsonable_check(v):
    if not v:
        return None
    errs = {n: {k: (x if math.isfinite(x) else str(x)) for k, x in e.items()} for n, e in v["errors"].items()}
    return {"passed_out": v["out_ok"], "passed_grad": v["grad_ok"], "shape": v.get("check_label"), "errors": errs}


def _measure_case(case, provs, verdicts, inputs, s: Settings, limits, mem_queue):
    """One result row per provider: checked ones are timed, then their peak memory measured (CPU: queued
    for the worker process)."""
    rows, fns = {}, {}
    for p in provs:
        rows[p.name], fn = _row(case, p, verdicts[p.name], inputs, s)
        if fn is not None:
            fns[p.name] = fn
    if case.timed and fns:
        mask = inputs.get("mask") if inputs else None
        key_lens = mask.sum(-1).tolist() if mask is not None else None
        faults = {}
        for n, ts in _time(fns, rows, s, faults).items():
            _figures(rows[n], case, summarize(ts), limits, key_lens)
            rows[n]["faults_per_call"] = faults.get(n)
    if s.memory and case.mode != "bwd":  # bwd's peak is inside fwd+bwd's; measuring it too doubles the cost
        for n, fn in fns.items():
            if rows[n]["status"] != "ok":
                continue
            if s.device == "cuda":
                try:
                    rows[n]["peak_bytes"] = peak_memory_cuda(fn)
                except Exception as e:  # noqa: BLE001
                    rows[n]["memory_error"] = f"{type(e).__name__}: {e}"
            else:
                mem_queue.append(rows[n])
    fns.clear()
    return list(rows.values())


def _row(case, p: Provider, v: dict, inputs, s: Settings):
    """(the result row of provider ``p`` given its check verdict ``v``, its timed callable or None)."""
    row = {"_case": case, **case.to_dict(), "provider": p.name, "status": v["status"], "reason": v["reason"],
           "check": _jsonable_check(v["check"]), "time": None, "tflops": None, "gbps": None,
           "peak_bytes": None, "memory_error": None, "over_limit": False}
    c = v["check"]
    if v["status"] != "ok":
        return row, None
    if c.get("grad_error") and case.mode != "fwd":
        row["status"], row["reason"] = "error", c["grad_error"]
    elif not c["out_ok"] or (case.mode != "fwd" and not c["grad_ok"]):
        row["status"], row["reason"] = "WRONG", c["worst"]
    elif p.quadratic and case.op == "attention" and _quadratic_bytes(case) > _mem_budget(s.device):
        row["status"] = "skipped"
        row["reason"] = (f"needs ~{_quadratic_bytes(case) / 2**30:.1f} GiB for the Nq x Nk scores "
                         f"(budget {_mem_budget(s.device) / 2**30:.1f} GiB)")
    else:
        try:
            return row, build_timed(case, p, s.device, s.seed, inputs=inputs)
        except Exception as e:  # noqa: BLE001
            row["status"], row["reason"] = "error", f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return row, None


def _time(fns: dict, rows: dict, s: Settings, faults: dict) -> dict:
    """{provider: [seconds per call]}, interleaved; if one provider fails, the rest are timed one by one.
    ``faults``: filled with minor page faults per call on the CPU (see :func:`time_interleaved`)."""
    timing = dict(threads=s.threads, **s.timing)
    if s.device == "cpu":
        timing["faults"] = faults
    try:
        return time_interleaved(fns, s.device, **timing)
    except Exception:  # noqa: BLE001 (one bad provider must not lose the others' times)
        times = {}
        for n, fn in fns.items():
            try:
                times.update(time_interleaved({n: fn}, s.device, **timing))
            except Exception as e:  # noqa: BLE001
                rows[n]["status"], rows[n]["reason"] = "error", f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return times


def _figures(row: dict, case: Case, t: dict, limits: Limits, key_lens=None) -> None:
    """Throughput, the case's roofline time and the provider's fraction of it; a fraction above 100% is flagged
    (``over_limit``) as an accounting error: no provider can beat the machine's measured peaks.

    The roofline time is ``max(FLOPs / matmul peak, bytes / memory peak)`` over the counts the case has; the
    memory peak is measured with probes that move the case's bytes (the same footprint in the caches) and
    beyond the caches. ``frac_of_roofline`` = roofline time / median time = the larger of ``frac_of_matmul`` and
    ``frac_of_memory``."""
    row["time"] = t
    sec = t["median_ms"] / 1e3
    f, b = flops(case, key_lens), bytes_moved(case, key_lens)
    dt = case.torch_dtype
    floor = []
    if f is not None:
        row["tflops"] = f / sec / 1e12
        peak, n = limits.matmul_peak(dt)
        row["matmul_n"], row["matmul_tflops"] = n, peak
        row["frac_of_matmul"] = row["tflops"] / peak if peak else None
        if peak:
            floor.append(f / (peak * 1e12))
    if b is not None:
        row["gbps"] = b / sec / 1e9
        peak = limits.memory_peak(dt, b)
        row["memory_gbps"] = peak
        row["frac_of_memory"] = row["gbps"] / peak if peak else None
        if peak:
            floor.append(b / (peak * 1e9))
    row["roofline_ms"] = 1e3 * max(floor) if floor else None
    frac = row["roofline_ms"] / t["median_ms"] if floor else None
    row["frac_of_roofline"] = frac
    row["over_limit"] = frac is not None and frac > 1.0
    if row["over_limit"]:
        row["accounting"] = (f"accounting bug: {100 * frac:.0f}% of the measured peak (> 100%): the work count or the "
                             f"peak measurement is wrong, not the kernel fast")


def _ratios(results: list[dict]) -> None:
    """speedup = baseline median time / provider median time, within each case (>1: faster than baseline);
    max_speedup = baseline median time / the case's roofline time: the largest speedup any provider could show
    on this machine (a goal above it is beyond the hardware)."""
    base = {}
    for r in results:
        if r["provider"] == BASELINES[r["op"]] and r["time"]:
            base[_rkey(r)] = r["time"]["median_ms"]
    for r in results:
        b = base.get(_rkey(r))
        r["baseline"] = BASELINES[r["op"]]
        r["speedup"] = (b / r["time"]["median_ms"]) if (b and r["time"]) else None
        roof = r.get("roofline_ms")
        r["max_speedup"] = (b / roof) if (b and roof) else None


def _rkey(r):
    return (r["op"], r["mode"], r["dtype"], tuple(r["shape"].values()), r["causal"], r["padding"], r["residual"],
            tuple(sorted(r.get("model", {}).items())))

