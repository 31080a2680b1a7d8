"""Appends one record per GPU-verified backend to pyllm/verified.json (benchmarks/gpu_check.sh calls it).

    python benchmarks/gpu_record.py --backend cuda --ops attention layer_norm rms_norm \\
        [--file pyllm/verified.json] [--gpu NAME --capability 9.0 --commit SHA --date 2026-11-30]

File format: {"records": [{"backend", "ops", "gpu", "capability", "date", "commit", "torch", "triton"}, ...]},
one record per backend whose tests passed on that GPU; records are only ever appended (an identical record
is not written twice). Missing fields are read from the machine (torch.cuda, git, today's UTC date).
The file is written atomically (a temporary file renamed over it), created when missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("backend", "ops", "gpu", "capability", "date", "commit", "torch", "triton")


def _machine() -> dict:
    """GPU name, capability, torch and triton versions of this machine ('' where unknown)."""
    info = {"gpu": "", "capability": "", "torch": "", "triton": ""}
    try:
        import torch

        info["torch"] = torch.__version__.split("+")[0]
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    except Exception:  # a record is still worth writing with what is known
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    return info


def _commit() -> str:
    """HEAD, with "+changes" when the working tree differs from it (the device tool's copy of the repository
    carried the session's first HEAD under a later tree, 2026-11-30: the hash alone named the wrong code)."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!pyllm/verified.json"],  # the record this run appends
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+changes" if dirty else "")


def load(path: str) -> dict:
    if not os.path.exists(path):
        return {"records": []}
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError(f"{path}: expected an object with a 'records' list, got {type(data).__name__}")
    return data


def append(path: str, record: dict) -> bool:
    """Adds ``record`` unless an identical one is there; returns True when the file changed."""
    data = load(path)
    if record in data["records"]:
        return False
    data["records"].append(record)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, choices=("cuda", "triton"))
    ap.add_argument("--ops", nargs="+", required=True, help="ops whose tests passed, e.g. attention layer_norm")
    ap.add_argument("--file", default=os.path.join(ROOT, "pyllm", "verified.json"))
    for name in ("gpu", "capability", "commit", "date", "torch", "triton"):
        ap.add_argument(f"--{name}", default=None)
    args = ap.parse_args(argv)
    known = _machine()
    rec = {
        "backend": args.backend,
        "ops": sorted(set(args.ops)),
        "gpu": args.gpu if args.gpu is not None else known["gpu"],
        "capability": args.capability if args.capability is not None else known["capability"],
        "date": args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "commit": args.commit if args.commit is not None else _commit(),
        "torch": args.torch if args.torch is not None else known["torch"],
        "triton": args.triton if args.triton is not None else known["triton"],
    }
    if not rec["gpu"]:
        print("gpu_record: no GPU name (torch sees no GPU and --gpu was not given): nothing recorded",
              file=sys.stderr)
        return 1
    changed = append(args.file, {k: rec[k] for k in FIELDS})
    print(f"gpu_record: {'added' if changed else 'already there'}: {json.dumps(rec)} -> {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
