"""``pyllm bench``: measure pyllm's ops against PyTorch and peer libraries (see docs/bench.md).

Only the standard library is imported at module level: ``pyllm --help`` must stay fast.
"""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
examples:
  pyllm bench --quick                          tiny shapes, all ops, about a minute on 2 CPU cores
  pyllm bench --op attention --shape 4,8,1024,64 --causal yes --mode fwd fwd+bwd
  pyllm bench --op layer_norm --shape 4096,768 --shape 4096,4096 --dtype fp32 bf16
  pyllm bench --preset long --device cuda --out results/h100
  pyllm bench --preset decode                  one generation step (Nq=1) at Nk 128..1024, fp32 and bf16
  pyllm bench --preset sweep --plots docs/img   the ratio to torch from the smallest size to the largest (plot)
  pyllm bench --list                           who can be measured here, and why not

Shapes: B,H,N,D (attention; B,H,N,D,Hkv for GQA), M,N (layer_norm / rms_norm; gelu=M,N), train_step=B,T.
Providers: pyllm-<backend>, sdpa, sdpa-{flash,efficient,cudnn,math} (CUDA), eager, torch (norms), torch-gelu,
flash_attn, xformers, liger_kernel, apex; or the groups pyllm, torch, peers.
Exit status: 0 all measured providers were right, 1 some were WRONG or failed, 2 bad arguments.
"""


def add_parsers(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark the ops against PyTorch and peers (checked, then timed)",
                              description="Check every provider against pyllm.reference, then time it; print a "
                                          "table, write JSON and PNG plots.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what")
    g.add_argument("--op", nargs="+", metavar="OP",
                   help="attention, layer_norm, rms_norm, rotary, linear_cross_entropy, gelu, train_step "
                        "(default: all)")
    g.add_argument("--provider", nargs="+", metavar="P", help="providers or groups to run (default: all available; "
                                                              "each op's baseline is always added)")
    g.add_argument("--preset", default=None, help="quick, default, long, decode (Nq=1 steps), small (small calls: "
                                                    "norms 16x768 / 128x768, attention N=16) or sweep (ratio to "
                                                    "torch across sizes, plotted) (default: default)")
    g.add_argument("--quick", action="store_const", dest="preset", const="quick", help="same as --preset quick")
    g.add_argument("--long", action="store_const", dest="preset", const="long", help="same as --preset long")
    g.add_argument("--shape", action="append", default=[], metavar="S",
                   help="user shape, repeatable: B,H,N,D[,Hkv] or M,N or train_step=B,T (replaces the preset's)")
    g.add_argument("--dtype", nargs="+", metavar="D", help="fp32, bf16, fp16, fp64 (default: per op and device)")
    g.add_argument("--mode", nargs="+", metavar="M", help="fwd, bwd, fwd+bwd (default: the preset's; all three "
                                                           "except decode (fwd) and small (fwd, fwd+bwd))")
    g.add_argument("--causal", choices=("no", "yes", "both"), default="preset", help="attention masking")
    g.add_argument("--padding", action="store_true", help="attention with a key padding mask")
    g.add_argument("--residual", choices=("no", "yes", "both"), default="preset", help="norms with fused residual")
    g.add_argument("--features", nargs="*", default=None, metavar="CASE",
                   help="instead: attention feature comparisons dropout, packed, window, bias (default all; "
                        "pyllm.bench.features)")
    g.add_argument("--flex", action="store_true", help="with --features: FlexAttention too (torch.compile first)")
    h = p.add_argument_group("how")
    h.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    h.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's count; 1 with --quick)")
    h.add_argument("--repeats", type=int, default=None, help="timed rounds per provider (default: per preset)")
    h.add_argument("--warmup", type=int, default=None, help="warm-up calls per provider (default: per preset)")
    h.add_argument("--max-time", type=float, default=None, dest="max_s",
                   help="seconds of timing per provider per case (fewer rounds when calls are slow)")
    h.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="bench-results", help="folder for bench.json and plots (default: bench-results)")
    o.add_argument("--json", default=None, help="JSON path (default: OUT/bench.json)")
    o.add_argument("--plots", default=None, help="plot folder (default: OUT)")
    o.add_argument("--no-plots", action="store_true", help="write no PNGs")
    o.add_argument("--list", action="store_true", help="list providers and whether they can run here, then exit")
    o.add_argument("--quiet", action="store_true", help="no progress lines")


def _error(msg: str) -> int:
    print(f"pyllm bench: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    """Entry point of ``pyllm bench``; returns the exit status (0 ok, 1 a provider WRONG/failed, 2 bad arguments)."""
    from .spec import BenchError

    try:
        return _run(args)
    except BenchError as e:
        return _error(str(e))


def _run(args) -> int:
    import torch

    from . import providers as P
    from . import report as R
    from . import runner
    from .spec import PRESETS, BenchError, parse_dtype, parse_modes, parse_ops, parse_shape

    preset = args.preset or "default"
    if preset not in PRESETS:
        raise BenchError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch.cuda.is_available() is False on this machine")
    ops = parse_ops(args.op)
    modes = parse_modes(args.mode) if args.mode else None  # None: the preset's modes
    dtypes = [parse_dtype(d) for d in args.dtype] if args.dtype else None
    shapes = [parse_shape(s, ops) for s in args.shape]
    for name, v in (("--threads", args.threads), ("--repeats", args.repeats)):
        if v is not None and v < 1:
            raise BenchError(f"{name}: expected a positive integer, got {v}")
    if args.warmup is not None and args.warmup < 0:
        raise BenchError(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if args.max_s is not None and args.max_s <= 0:
        raise BenchError(f"--max-time: expected seconds > 0, got {args.max_s}")
    usable, table = P.select(args.provider, ops, device)
    if args.list:
        for name, row in table.items():
            state = row["status"] + (f" ({row['reason']})" if row["reason"] else "")
            print(f"{name:<16} {row['kind']:<6} {','.join(row['ops']):<30} {state}")
        return 0
    threads = args.threads or (1 if preset == "quick" and device == "cpu" else None)
    if args.features is not None:
        import json

        from . import features

        bad = [c for c in args.features if c not in features.CASES]
        if bad:
            raise BenchError(f"--features: expected some of {', '.join(features.CASES)}, got {bad}")
        res = features.run(device, quick=preset == "quick", threads=threads, which=args.features or None,
                           flex=args.flex)
        json_path = args.json or os.path.join(args.out, "bench-features.json")
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {json_path}")
        return 0
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    report = runner.bench(ops, preset=preset, device=device, shapes=shapes, dtypes=dtypes, modes=modes,
                          causal=args.causal, padding=args.padding, residual=args.residual, providers=args.provider,
                          threads=threads, repeats=args.repeats, warmup=args.warmup, max_s=args.max_s,
                          memory=not args.no_memory, log=log)
    json_path = args.json or os.path.join(args.out, "bench.json")
    if not args.no_plots:
        report["plots"] = R.plot(report, args.plots or os.path.dirname(os.path.abspath(json_path)))
    R.write_json(report, json_path)
    print(R.table(report))
    print(f"\nwrote {json_path}" + (f" and {len(report.get('plots', []))} plots" if not args.no_plots else ""))
    bad = [r for r in report["results"] if r["status"] in ("WRONG", "error")]
    for r in bad:
        print(f"{r['status']}: {r['provider']} {r['op']} {r['mode']} {r['label']} {r['dtype']}: {r['reason']}",
              file=sys.stderr)
    return 1 if bad else 0


def main(argv=None) -> int:
    """``python -m pyllm.bench.cli``: the same command without the ``pyllm`` front end."""
    parser = argparse.ArgumentParser(prog="pyllm bench", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
