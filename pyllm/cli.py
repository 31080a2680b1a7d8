"""The pyllm command: check, info, bench, pretrain, finetune, evaluate, predict, generate, plan.

Subcommand modules add their own parsers (``add_parsers(subparsers)``); they and the package faces
above them import only the standard library (:mod:`pyllm._lazy`), so ``pyllm --help`` and
``pyllm <command> --help`` never load torch.
"""
from __future__ import annotations

import argparse
import platform
import sys

from pyllm.bench import cli as bench_cli
from pyllm.train import cli as train_cli


def _cmd_check(args) -> int:
    import pyllm

    chosen = args.backend or None
    if chosen:
        unknown = [b for b in chosen if b not in pyllm.backends.NAMES]
        if unknown:
            print(f"pyllm check: unknown backend {unknown[0]!r}; expected one of "
                  f"{', '.join(pyllm.backends.NAMES)}", file=sys.stderr)
            return 2
        missing = {b: r for b, r in pyllm.backends.unavailable().items() if b in chosen}
        if missing:
            for b, r in missing.items():
                print(f"pyllm check: backend {b!r} is not available: {r}", file=sys.stderr)
            return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            print(f"pyllm check: --device cuda, but {why} (torch {torch.__version__}); run it on a machine "
                  "with a GPU, or check --device cpu", file=sys.stderr)
            return 2
    ok = pyllm.check(chosen, device=args.device, full=args.full)
    return 0 if ok else 1


def _cmd_info(args) -> int:
    import torch

    import pyllm
    from pyllm import capabilities

    print(f"pyllm {pyllm.__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), {torch.get_num_threads()} threads")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("GPU: none (torch.cuda.is_available() is False)")
    print("\nbackends available:", ", ".join(pyllm.backends.available()))
    for name, why in pyllm.backends.unavailable().items():
        print(f"  {name}: not available: {why}")
    print("\nwhat each backend serves (pyllm/capabilities.py):")
    print("\n".join("  " + line for line in capabilities.table().splitlines()))
    print("\nverified on a GPU (pyllm/verified.json, written by benchmarks/gpu_check.sh runs):")
    for name in pyllm.backends.NAMES:
        print("  " + pyllm.backends.verification(name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("check", help="check every available backend against the reference (accuracy rule)")
    p.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device of the test tensors (default: cuda if present)")
    p.add_argument("--full", action="store_true", help="a larger grid (hidden 65536, seqlen 1000, head_dim 256)")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("info", help="versions, GPU, and which backends are available (and why others are not)")
    p.set_defaults(func=_cmd_info)
    bench_cli.add_parsers(sub)
    train_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
