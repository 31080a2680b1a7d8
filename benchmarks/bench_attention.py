"""Attention: every pyllm backend against torch SDPA and the eager (softmax(QK^T)V) reference.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick] [--json out.json]

Timed: forward, backward and forward+backward at (B4, H8, N1024, D64) causal and not, and
(B1, H8, N4096, D64) causal; TFLOP/s by FlashAttention's count and each provider's speed ratio to SDPA.
Then peak memory against seqlen (512 .. 8192, forward and forward+backward): linear for the fused
kernels, quadratic for the eager math, which is skipped once its N x N scores would not fit sensibly.
Every provider is checked against pyllm.reference before it is measured. A thin front end over pyllm.bench.
On CPU tensors the triton backend runs only in the interpreter and is not timed (too slow).

--features runs instead the FlashAttention-feature comparisons of pyllm.bench.features (dropout vs SDPA with
dropout, packed sequences vs the padded batch, sliding window vs full causal per query, attn_bias vs an SDPA
float mask; --flex adds torch's FlexAttention with a sliding-window block mask, compiled first).
"""
from __future__ import annotations

import argparse
import sys

TIMED = [(4, 8, 1024, 64, False), (4, 8, 1024, 64, True), (1, 8, 4096, 64, True)]
QUICK_TIMED = [(1, 2, 128, 32, False), (1, 2, 128, 32, True), (1, 2, 256, 32, True)]
MEMORY_SEQLENS = [512, 1024, 2048, 4096, 8192]
QUICK_MEMORY_SEQLENS = [128, 256, 512]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--plots", default=None, help="write PNG plots (throughput, memory vs seqlen) here")
    ap.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's count)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory sweep")
    ap.add_argument("--features", nargs="*", default=None, metavar="CASE",
                    help="run the feature comparisons (dropout, packed, window, bias; default all) instead")
    ap.add_argument("--flex", action="store_true", help="with --features: add FlexAttention (torch.compile)")
    args = ap.parse_args(argv)
    if args.features is not None:  # the same as `pyllm bench --features`
        from pyllm.bench import cli

        return cli.main(["--features", *args.features, *(["--flex"] if args.flex else []),
                         *(["--quick"] if args.quick else []), *(["--device", args.device] if args.device else []),
                         *(["--threads", str(args.threads)] if args.threads else []),
                         *(["--json", args.json] if args.json else [])])

    import torch

    from pyllm import bench
    from pyllm.bench.spec import Case, parse_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dtype = parse_dtype(args.dtype) if args.dtype else ("bf16" if device == "cuda" else "fp32")
    except bench.BenchError as e:
        print(f"bench_attention: error: {e}", file=sys.stderr)
        return 2
    cases = [Case(op="attention", mode=m, dtype=dtype, dims=(B, H, H, N, N, D), causal=c, sweep="user")
             for B, H, N, D, c in (QUICK_TIMED if args.quick else TIMED) for m in ("fwd", "bwd", "fwd+bwd")]
    if not args.no_memory:
        H, D = (2, 32) if args.quick else (8, 64)
        cases += [Case(op="attention", mode=m, dtype=dtype, dims=(1, H, H, N, N, D), causal=True, sweep="memory",
                       timed=False)
                  for N in (QUICK_MEMORY_SEQLENS if args.quick else MEMORY_SEQLENS) for m in ("fwd", "fwd+bwd")]
    if device == "cpu":
        print("note: the triton backend is not timed on CPU: on CPU tensors it runs only in the Triton "
              "interpreter (TRITON_INTERPRET=1), far too slow to time; the test suite checks it instead.")
    return bench.run_script("bench_attention", cases, args, device)


if __name__ == "__main__":
    sys.exit(main())
