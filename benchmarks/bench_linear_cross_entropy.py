"""Fused linear cross-entropy: pyllm.linear_cross_entropy against F.linear + F.cross_entropy (and Liger's
fused op where installed): peak memory and time of one forward+backward.

    python benchmarks/bench_linear_cross_entropy.py [--device cpu|cuda] [--quick] [--json out.json]

Sizes (tokens, hidden, vocab): (8192, 2048, 32000) and (8192, 2048, 128256), fp32 on the CPU (bf16 on a
GPU); --quick: (1024, 256, 8000) and (512, 256, 32003). Goals (issue 17): peak memory at most 1/4 of the
unfused one, time within 1.1x. The full sizes need about 14 GB for the unfused side and minutes on 2
cores. Each provider is checked against pyllm.reference first (at a reduced token count when the float64
reference would not fit), then timed alternately; peak memory is measured in a fresh worker process
(the resident-set high-water mark on the CPU). A thin front end: the work is pyllm.bench's.
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
    args = ap.parse_args(argv)

    import torch

    from pyllm import bench
    from pyllm.bench.spec import Case

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bf16" if device == "cuda" else "fp32"
    cases = [Case(op="linear_cross_entropy", mode="fwd+bwd", dtype=dtype, dims=shape, sweep="vocab")
             for shape in (QUICK_SHAPES if args.quick else SHAPES)]
    return bench.run_script("bench_linear_cross_entropy", cases, args, device)


if __name__ == "__main__":
    sys.exit(main())
