"""Fused linear cross-entropy: pyllm.linear_cross_entropy against F.linear + F.cross_entropy (and Liger's
fused op where installed): peak memory and time of one forward+backward.

    python benchmarks/bench_linear_cross_entropy.py [--device cpu|cuda] [--quick] [--json out.json]

Sizes (tokens, hidden, vocab): (8192, 2048, 32000) and (8192, 2048, 128256), fp32 on the CPU (bf16 on a
GPU); --quick: (1024, 256, 8000) and (512, 256, 32003). Goals (issue 17): peak memory at most 1/4 of the
unfused one, time within 1.1x. The full sizes need about 14 GB for the unfused side and minutes on 2
cores. Each provider is checked against pyllm.reference first (at a reduced token count when the float64
reference would not fit), then timed alternately; peak memory is measured in a fresh worker process
(the resident-set high-water mark on the CPU). A thin front end: the work is pyllm.bench's.

--single: at the issue's sizes a call takes most of a minute on 2 CPU cores, and the full run (checks,
alternating rounds, a warm-up before each memory measurement) takes over an hour. --single instead runs
ONE forward+backward per provider (pyllm fused, then F.linear + F.cross_entropy), each in a fresh process
with glibc's mmap threshold at 64 KiB (every large tensor its own mapping, returned when freed), after a
tiny call of the same provider has loaded its libraries: peak extra resident memory (VmHWM after resetting
it, minus VmRSS with the inputs allocated) and the time of that call.
"""
from __future__ import annotations

import argparse
import sys

SHAPES = [(8192, 2048, 32000), (8192, 2048, 128256)]
QUICK_SHAPES = [(1024, 256, 8000), (512, 256, 32003)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--plots", default=None, help="write PNG plots into this folder")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's count)")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--single", action="store_true", help="one fwd+bwd per provider in a fresh process: peak "
                                                          "extra memory and time of that call (see above)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(*args.child)
    if args.single:
        return _single(QUICK_SHAPES if args.quick else SHAPES)

    import torch

    from pyllm import bench
    from pyllm.bench.spec import Case

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bf16" if device == "cuda" else "fp32"
    cases = [Case(op="linear_cross_entropy", mode="fwd+bwd", dtype=dtype, dims=shape, sweep="vocab")
             for shape in (QUICK_SHAPES if args.quick else SHAPES)]
    return bench.run_script("bench_linear_cross_entropy", cases, args, device)


def _child(provider: str, n: str, h: str, v: str) -> int:
    """One fwd+bwd of ``provider`` at (n, h, v) fp32 in this fresh process; prints 'peak_bytes seconds'."""
    import time

    import torch
    import torch.nn.functional as F

    import pyllm

    def status_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(key)

    N, H, V = int(n), int(h), int(v)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, H, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    def call(h, w, y):
        if provider == "pyllm":
            return pyllm.linear_cross_entropy(h, w, y)
        return F.cross_entropy(F.linear(h, w).float(), y)

    # load the libraries (pyllm's extension, the op's first-call setup) on a tiny call, outside the measurement
    call(torch.randn(64, 32, requires_grad=True), torch.randn(128, 32, requires_grad=True),
         torch.randint(0, 128, (64,))).backward()
    fn = lambda: call(hidden, weight, labels)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    t0 = time.perf_counter()
    fn().backward()
    dt = time.perf_counter() - t0
    print(max(0, status_kb("VmHWM") - base), dt)
    return 0


def _single(shapes) -> int:
    import os
    import platform
    import subprocess

    import torch

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"one fwd+bwd per provider in a fresh process, fp32, {torch.get_num_threads()} threads, {cpu}")
    print(f"{'tokens x hidden x vocab':<24} {'provider':<9} {'peak extra MiB':>15} {'time s':>8}")
    for shape in shapes:
        res = {}
        for prov in ("pyllm", "unfused"):
            out = subprocess.run([sys.executable, __file__, "--child", prov, *map(str, shape)], env=env,
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{prov} failed: {out.stderr[-2000:]}")
                return 1
            peak, dt = out.stdout.split()
            res[prov] = (int(peak), float(dt))
            print(f"{'x'.join(map(str, shape)):<24} {prov:<9} {res[prov][0] / 2**20:>15.0f} {res[prov][1]:>8.1f}",
                  flush=True)
        mem = res["pyllm"][0] / max(res["unfused"][0], 1)
        t = res["pyllm"][1] / res["unfused"][1]
        print(f"  pyllm / unfused: memory {mem:.2f}x (goal <= 0.25), time {t:.2f}x (goal <= 1.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
