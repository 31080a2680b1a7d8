"""Writes report.md and report.json for benchmarks/gpu_check.sh from its steps.tsv and logs/.

Usage: python benchmarks/gpu_report.py REPORT_DIR VERDICT TOTAL_SECONDS
Standard library only, so that it runs wherever gpu_check.sh does.
"""
import json
import os
import re
import sys

TAIL_LINES = 40
# Lines worth lifting out of the logs into the summary: harness verdicts and throughputs, test totals.
HIGHLIGHT = re.compile(r"(TFLOP/s|GB/s|cases passed|FAIL|passed|failed|error|Error|device \d+:|torch |triton )")


def read_steps(out_dir):
    steps = []
    path = os.path.join(out_dir, "steps.tsv")
    if not os.path.exists(path):
        return steps
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                continue
            name, status, rc, secs, timeout, command = parts[:6]
            log = os.path.join(out_dir, "logs", f"{name}.log")
            text = open(log, errors="replace").read() if os.path.exists(log) else ""
            lines = text.splitlines()
            steps.append({
                "name": name, "status": status, "rc": rc, "seconds": int(secs) if secs.isdigit() else secs,
                "timeout": timeout, "command": command, "log": os.path.relpath(log, out_dir),
                "tail": lines[-TAIL_LINES:],
                "highlights": [l for l in lines if HIGHLIGHT.search(l)][-30:],
            })
    return steps


def write_markdown(out_dir, verdict, total, steps):
    md = [f"# pyllm GPU check: {verdict}", "", f"Total time: {total} s.", "",
          "| step | status | rc | seconds | timeout | command |", "| --- | --- | --- | --- | --- | --- |"]
    for s in steps:
        cmd = s["command"].replace("|", "\\|")
        if len(cmd) > 90:
            cmd = cmd[:87] + "..."
        md.append(f"| {s['name']} | **{s['status']}** | {s['rc']} | {s['seconds']} | {s['timeout']} | `{cmd}` |")
    for s in steps:
        md += ["", f"## {s['name']} ({s['status']})", "", f"log: `{s['log']}`", ""]
        if s["highlights"] and s["name"] != "env":
            md += ["Highlights:", "", "```", *s["highlights"], "```", ""]
        md += [f"Last {TAIL_LINES} lines:", "", "```", *s["tail"], "```"]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main():
    out_dir, verdict, total = sys.argv[1], sys.argv[2], sys.argv[3]
    steps = read_steps(out_dir)
    write_markdown(out_dir, verdict, total, steps)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"verdict": verdict, "total_seconds": int(total), "steps": steps}, f, indent=2)


if __name__ == "__main__":
    main()
