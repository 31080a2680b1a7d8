"""LayerNorm / RMSNorm: every pyllm backend against torch.nn.functional.layer_norm / rms_norm.

    python benchmarks/bench_layer_norm.py [--device cpu|cuda] [--quick] [--json out.json]

Forward and forward+backward at (4096 x 768), (4096 x 4096), (16384 x 1024) in fp32 and bf16; each
provider is checked against pyllm.reference first, then all sides are timed alternately (median of the
rounds). Prints the table and, per case, each provider's speed ratio to F.layer_norm (> 1 = faster).
A thin front end: the work is pyllm.bench's (see docs/bench.md).
"""
from __future__ import annotations

import argparse
import sys

SHAPES = [(4096, 768), (4096, 4096), (16384, 1024)]
QUICK_SHAPES = [(256, 768), (512, 1024)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--plots", default=None, help="write PNG plots into this folder")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's count)")
    ap.add_argument("--no-rms", action="store_true", help="LayerNorm only")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    args = ap.parse_args(argv)

    import torch

    from pyllm import bench
    from pyllm.bench.spec import Case

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = ["layer_norm"] + ([] if args.no_rms else ["rms_norm"])
    cases = [Case(op=op, mode=mode, dtype=dt, dims=shape, sweep="hidden")
             for op in ops for dt in ("fp32", "bf16") for shape in (QUICK_SHAPES if args.quick else SHAPES)
             for mode in ("fwd", "fwd+bwd")]
    return bench.run_script("bench_layer_norm", cases, args, device)


if __name__ == "__main__":
    sys.exit(main())
