"""Decode attention on the CPU against its memory roofline: is a ratio to torch SDPA physically possible?

    python benchmarks/bench_decode_roofline.py [--threads 2] [--reps 300] [--dtype fp32 bf16] [--cold]

A decode step (Nq = 1) reads all of K and V once and does 2 FLOPs per byte or less: its time is bound by
how fast the cores read K + V. For each of issue 15's decode cases (B1 H12 Nk128, B1 H12 Nk1024, B8 H12
Nk512, D64) this times, paired and alternating in one process, under torch.no_grad:

    sdpa     F.scaled_dot_product_attention on (B, H, N, D) tensors (its own layout)
    pyllm    pyllm.attention(..., backend="cpu") on (B, N, H, D) tensors (the op layer included)
    direct   torch.ops.pyllm.attention_fwd (the C++ kernel without the Python op layer; copies of q, k, v)
    read     a read-only streaming sum (Tensor.sum) over an fp32 buffer of K + V's byte count, warm: the
             same buffer every call, as every provider above reads the same K and V every call

and prints each as milliseconds (best and median of --reps) and GB/s of K + V bytes. --cold adds the same
read over buffers rotated through more than the last-level cache (K and V fresh from DRAM). The ratio a
provider can reach over SDPA is at most sdpa_time / (bytes / read GB/s). Timings on a shared machine are
noisy: the best of many alternating rounds is the figure to compare. ``pyllm bench --preset decode`` prints the
same bound for every case (its ``max`` column: SDPA's median time over the case's roofline time, with the
memory peak the best of a read, a copy and an add of the case's bytes); this script is the closer look, with
best-of-many times and a cold-cache read.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CASES = ((1, 128), (1, 1024), (8, 512))  # (batch, keys); 12 heads of 64, one query row
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        return int(s[:-1]) * {"K": 1 << 10, "M": 1 << 20}[s[-1]]
    except (OSError, ValueError, KeyError):
        return 256 << 20


def paired(fns: dict, reps: int) -> dict:
    """{name: (best, median)} seconds per call: one call of each provider per round, who goes first rotating
    (as ``pyllm bench`` does); each reads its own tensors, so none finds another's data in its L2."""
    times = {n: [] for n in fns}
    names = list(fns)
    for f in fns.values():
        for _ in range(10):
            f()
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            f = fns[n]
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    return {n: (min(v), statistics.median(v)) for n, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--cold", action="store_true", help="also read buffers rotated through more than the LLC")
    a = ap.parse_args(argv)
    import pyllm

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"threads {a.threads}, best/median of {a.reps} alternating rounds; GB/s of K + V bytes at the best time")
    with torch.no_grad():
        for dname in a.dtype:
            dt = DTYPES[dname]
            for B, Nk in CASES:
                q = torch.randn(B, 1, 12, 64, dtype=dt)
                k, v = torch.randn(B, Nk, 12, 64, dtype=dt), torch.randn(B, Nk, 12, 64, dtype=dt)
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
                q2, k2, v2 = q.clone(), k.clone(), v.clone()
                nbytes = 2 * k.numel() * k.element_size()
                warm = torch.ones(nbytes // 4)
                fns = {"sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=0.125),
                       "pyllm": lambda: pyllm.attention(q, k, v, softmax_scale=0.125, backend="cpu"),
                       "direct": lambda: torch.ops.pyllm.attention_fwd(q2, k2, v2, None, False, 0.125),
                       "read": lambda: warm.sum()}
                if a.cold:
                    bufs = [torch.ones(nbytes // 4) for _ in range(2 * llc_bytes() // nbytes + 2)]
                    turn = iter(range(1 << 62))
                    fns["read-cold"] = lambda: bufs[next(turn) % len(bufs)].sum()
                r = paired(fns, a.reps)
                print(f"{dname} B{B} H12 Nk{Nk} D64: K+V {nbytes / 1e6:.2f} MB")
                for n, (best, med) in r.items():
                    print(f"  {n:9s} {best * 1e3:7.3f} ms (median {med * 1e3:7.3f})  {nbytes / best / 1e9:6.1f} GB/s"
                          + (f"  {r['sdpa'][0] / best:5.2f}x sdpa" if n != "sdpa" else ""))
                print(f"  roofline: at the warm read's rate a call takes {r['read'][0] * 1e3:.3f} ms, "
                      f"at most {r['sdpa'][0] / r['read'][0]:.2f}x sdpa", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
