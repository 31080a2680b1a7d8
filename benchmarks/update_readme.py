"""Regenerate README.md's results section from a bench JSON (``pyllm bench``, bench_attention.py, ...).

    python benchmarks/update_readme.py bench-results/bench.json [more.json ...] [--readme README.md]

The section lies between the lines ``<!-- bench:start -->`` and ``<!-- bench:end -->``; everything
between them is replaced. Plots named in the JSON are copied to ``docs/img/`` and linked. If the
README has no markers the section is printed instead, and nothing is edited.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plots(report: dict, json_path: str) -> list[str]:
    """Existing plot files of a report: as recorded, or next to the JSON under the same name."""
    out = []
    for p in report.get("plots", []):
        for cand in (p, os.path.join(os.path.dirname(os.path.abspath(json_path)), os.path.basename(p))):
            if os.path.isfile(cand):
                out.append(cand)
                break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="bench JSON file(s), each becomes a subsection")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--img-dir", default=os.path.join(ROOT, "docs", "img"), help="where plots are copied")
    ap.add_argument("--print", action="store_true", dest="print_only", help="print the section, edit nothing")
    args = ap.parse_args(argv)

    from pyllm.bench import report as R

    parts = []
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    for path in args.json:
        try:
            rep = R.load_json(path)
            if not str(rep.get("schema", "")).startswith("pyllm-bench/"):
                raise ValueError("not a pyllm bench report (no 'schema': 'pyllm-bench/...')")
        except (OSError, ValueError) as e:
            print(f"update_readme: error: {path}: {e}", file=sys.stderr)
            return 2
        images = []
        if not args.print_only:
            os.makedirs(args.img_dir, exist_ok=True)
            dev = rep["settings"]["device"]
            for src in _plots(rep, path):
                dst = os.path.join(args.img_dir, f"{dev}_{os.path.basename(src)}")
                shutil.copyfile(src, dst)
                images.append(os.path.relpath(dst, readme_dir).replace(os.sep, "/"))
        where = rep["machine"].get("gpu") or rep["machine"].get("cpu")
        parts.append(f"### {rep['settings']['device'].upper()}: {where}\n\n" + R.markdown(rep, images))
    section = "\n".join(parts)
    text = open(args.readme).read() if os.path.isfile(args.readme) else ""
    if args.print_only or START not in text or END not in text or text.index(START) > text.index(END):
        if not args.print_only:
            print(f"update_readme: {args.readme} has no {START} ... {END} markers; printing the section instead",
                  file=sys.stderr)
        print(section)
        return 0
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(args.readme, "w") as f:
        f.write(f"{head}{START}\n{section}\n{END}{tail}")
    print(f"updated {args.readme} ({len(parts)} report(s), images in {args.img_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
