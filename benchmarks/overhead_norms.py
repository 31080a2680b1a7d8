"""Per-call overhead of pyllm's norm op layer on small calls (issue 15 item 2), paired and alternating.

For each shape, times in the same process, round by round in rotating order:
``pyllm.layer_norm`` / ``pyllm.rms_norm`` (the op layer + the C++ kernel), the bare C++ op
``torch.ops.pyllm.layer_norm_fwd`` on 2-D inputs (the kernel floor) and ``F.layer_norm`` / ``F.rms_norm``.
Overhead = op layer - bare op. Modes: fwd under no_grad, and fwd+bwd (leaves require grad, backward of a
fixed dy). One thread by default: on a loaded machine more threads measure OpenMP waits, not the op.

    python benchmarks/overhead_norms.py [--threads 1] [--rounds 30] [--calls 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pyllm


def _variants(op, M, N, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, N, generator=g)
    w, b = 1 + 0.1 * torch.randn(N, generator=g), 0.1 * torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g)
    rms = op == "rms_norm"
    if mode == "fwd+bwd":
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    bb = None if rms else b
    fns = {
        "pyllm": (lambda: pyllm.rms_norm(x, (N,), w, 1e-6)) if rms else (lambda: pyllm.layer_norm(x, (N,), w, b)),
        "bare op": lambda: torch.ops.pyllm.layer_norm_fwd(x, w, bb, None, 1e-6 if rms else 1e-5, rms)[0],
        "torch": (lambda: F.rms_norm(x, (N,), w, 1e-6)) if rms else (lambda: F.layer_norm(x, (N,), w, b)),
    }
    leaves = [x, w] + ([] if rms else [b])
    if mode == "fwd":
        def wrap(f):
            def run():
                with torch.no_grad():
                    f()
            return run
    else:
        def wrap(f):
            return lambda: torch.autograd.grad(f(), leaves, dy)
    return {k: wrap(f) for k, f in fns.items()}


def measure(fns, rounds, calls):
    times = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():
        for _ in range(calls):
            f()
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            f = fns[n]
            t = time.perf_counter()
            for _ in range(calls):
                f()
            times[n].append((time.perf_counter() - t) / calls * 1e6)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"per-call microseconds, median [IQR] over {args.rounds} alternating rounds of {args.calls} calls, "
          f"{args.threads} thread(s); pyllm from {pyllm.__file__}")
    for op in ("layer_norm", "rms_norm"):
        for M in (16, 128):
            for mode in ("fwd", "fwd+bwd"):
                ts = measure(_variants(op, M, 768, mode), args.rounds, args.calls)
                q = {k: statistics.quantiles(v, n=4) for k, v in ts.items()}
                med = {k: statistics.median(v) for k, v in ts.items()}
                cells = "  ".join(f"{k} {med[k]:6.1f} [{q[k][0]:.1f}-{q[k][2]:.1f}]" for k in ts)
                print(f"{op:<10} {M:>4}x768 {mode:<7}  {cells}  overhead {med['pyllm'] - med['bare op']:5.1f}"
                      f"  vs torch {med['torch'] / med['pyllm']:.2f}x")


if __name__ == "__main__":
    main()
