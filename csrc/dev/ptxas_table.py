"""Registers, spills and shared memory of every CUDA kernel, from `ptxas -v` output, as one table.

    python csrc/dev/ptxas_table.py LOG_OR_DIR... [--markdown] [--fail-on-spill REGEX]

Reads ptxas' "Compiling entry function ... for 'sm_XX'" / "Function properties" / "Used N registers"
lines (nvcc --resource-usage or -Xptxas -v) from the files given (a directory: every *.log in it) and
prints one row per (kernel, arch): registers, spill stores/loads, stack frame, static shared memory
(dynamic shared memory is sized by the launchers at run time and is not in ptxas' output).
--fail-on-spill REGEX exits 1 when a kernel whose name matches REGEX spills (CMake's compile check uses
it for the attention kernels with a padded head dim <= 128). Standard library only: it runs wherever
nvcc does, GPU or not.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse(text: str) -> list[dict]:
    """One dict per compiled entry: name (mangled), arch, regs, spill_st, spill_ld, stack, smem."""
    rows, cur, frames = [], None, {}
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "regs": None, "spill_st": 0, "spill_ld": 0,
                   "stack": 0, "smem": 0}
            rows.append(cur)
            continue
        m = PROPS.search(line)
        if m:
            frames["fn"] = m.group(1)
            continue
        m = FRAME.search(line)
        if m and cur is not None and frames.get("fn") == cur["name"]:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = (int(g) for g in m.groups())
            continue
        m = USED.search(line)
        if m and cur is not None and cur["regs"] is None:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    # one row per (kernel, arch): the same object compiled twice (harness and library) repeats itself
    return list({(r["name"], r["arch"]): r for r in rows if r["regs"] is not None}.values())


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """`void pyllm::cuda::(anonymous namespace)::attn_fwd_kernel<__half, 128, 64, 8>(...)` ->
    `attn_fwd_kernel<half, 128, 64, 8>`."""
    name = name[len("void "):] if name.startswith("void ") else name
    name = name.replace("pyllm::cuda::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\([^()]*\)$", "", name)  # the parameter list
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "half")
    return name


def table(rows: list[dict], markdown: bool) -> str:
    names = demangle(sorted({r["name"] for r in rows}))
    rows = sorted(rows, key=lambda r: (short(names[r["name"]]), r["arch"]))
    head = ["kernel", "arch", "regs", "spill st B", "spill ld B", "stack B", "static smem B"]
    body = [[short(names[r["name"]]), r["arch"], r["regs"], r["spill_st"], r["spill_ld"], r["stack"], r["smem"]]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(f"`{c}`" if i == 0 else str(c) for i, c in enumerate(row)) + " |" for row in body]
        return "\n".join(lines)
    width = max([len(head[0])] + [len(b[0]) for b in body])
    fmt = f"{{:<{width}}}  {{:>5}}  {{:>4}}  {{:>10}}  {{:>10}}  {{:>7}}  {{:>13}}"
    return "\n".join([fmt.format(*head)] + [fmt.format(*map(str, b)) for b in body])


def read(paths: list[str]) -> str:
    text = []
    for p in paths:
        files = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".log")) if os.path.isdir(p) else [p]
        for f in files:
            with open(f, errors="replace") as fh:
                text.append(fh.read())
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="ptxas -v logs, or directories of *.log files")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    ap.add_argument("--fail-on-spill", metavar="REGEX", default=None,
                    help="exit 1 if a kernel whose short name matches REGEX spills registers")
    args = ap.parse_args(argv)
    rows = parse(read(args.paths))
    if not rows:
        print("ptxas_table: no ptxas -v output found in " + ", ".join(args.paths), file=sys.stderr)
        return 1
    print(table(rows, args.markdown))
    if args.fail_on_spill:
        names = demangle(sorted({r["name"] for r in rows}))
        bad = [f"{short(names[r['name']])} ({r['arch']}: {r['spill_st']} B stores, {r['spill_ld']} B loads)"
               for r in rows if (r["spill_st"] or r["spill_ld"]) and re.search(args.fail_on_spill, short(names[r["name"]]))]
        if bad:
            print("ptxas_table: spills in kernels matching " + repr(args.fail_on_spill) + ":\n  " + "\n  ".join(bad),
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
