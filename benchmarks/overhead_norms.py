"""Per-call overhead of pyllm's op layer on small calls (issue 15 item 2), paired and alternating.

For each shape, times in the same process, round by round in rotating order:
``pyllm.layer_norm`` / ``pyllm.rms_norm`` / ``pyllm.attention`` (the op layer + the C++ kernel), the C++ op
called through ``torch.ops.pyllm.*_fwd`` ("bare op": torch.ops' own boxing, the autograd kernel and the kernel)
and ``F.layer_norm`` / ``F.rms_norm`` / SDPA. Overhead = op layer - bare op (negative: the op layer's C++ fast
path skips torch.ops' cost). Modes: fwd under no_grad, fwd with grad (leaves require grad, no backward) and
fwd+bwd (backward of a fixed dy). One thread by default, timed by the thread's CPU time
(``time.thread_time``): on a loaded machine wall time and more threads measure waiting, not the op.

    python benchmarks/overhead_norms.py [--threads 1] [--rounds 30] [--calls 200] [--op layer_norm rms_norm attention]
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
    return {k: _wrap(f, mode, leaves, dy) for k, f in fns.items()}


def _wrap(f, mode, leaves, dy):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                f()
        return run
    if mode == "fwd (grad)":
        return f
    return lambda: torch.autograd.grad(f(), leaves, dy)


def _attention_variants(N, mode, B=1, H=12, D=64):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, N, H, D, generator=g) for _ in range(4))
    if mode != "fwd":
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, do))  # SDPA's layout, same storage
    fns = {
        "pyllm": lambda: pyllm.attention(q, k, v),
        "bare op": lambda: torch.ops.pyllm.attention_fwd(q, k, v, None, False, D ** -0.5)[0],
        "torch": lambda: F.scaled_dot_product_attention(qt, kt, vt),
    }
    return {k_: _wrap(f, mode, [q, k, v], dot if k_ == "torch" else do) for k_, f in fns.items()}


def measure(fns, rounds, calls, clock=time.thread_time):
    times = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():
        for _ in range(calls):
            f()
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            f = fns[n]
            t = clock()
            for _ in range(calls):
                f()
            times[n].append((clock() - t) / calls * 1e6)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--op", nargs="+", default=["layer_norm", "rms_norm", "attention"],
                    choices=["layer_norm", "rms_norm", "attention"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter  # other threads' work is not ours
    print(f"per-call microseconds ({'thread CPU time' if args.threads == 1 else 'wall'}), median [IQR] over "
          f"{args.rounds} alternating rounds of {args.calls} calls, {args.threads} thread(s); "
          f"pyllm from {pyllm.__file__}")
    cases = [(op, f"{M:>4}x768", lambda mode, op=op, M=M: _variants(op, M, 768, mode))
             for op in args.op if op != "attention" for M in (16, 128)]
    if "attention" in args.op:
        cases.append(("attention", "B1 H12 N16 D64", lambda mode: _attention_variants(16, mode)))
    for op, shape, variants in cases:
        for mode in ("fwd", "fwd (grad)", "fwd+bwd"):
            ts = measure(variants(mode), args.rounds, args.calls, clock)
            q = {k: statistics.quantiles(v, n=4) for k, v in ts.items()}
            med = {k: statistics.median(v) for k, v in ts.items()}
            cells = "  ".join(f"{k} {med[k]:6.1f} [{q[k][0]:.1f}-{q[k][2]:.1f}]" for k in ts)
            print(f"{op:<10} {shape} {mode:<10}  {cells}  overhead {med['pyllm'] - med['bare op']:5.1f}"
                  f"  vs torch {med['torch'] / med['pyllm']:.2f}x")


if __name__ == "__main__":
    main()
