"""Writes report.md and report.json for benchmarks/gpu_check.sh from its steps.tsv and step logs.

Usage: python benchmarks/gpu_report.py OUT_DIR LOGS_DIR VERDICT ELAPSED_S BUDGET_S
gpu_check.sh calls it after every step (so a run cut short still leaves a report) and at the end.
Both files are written to a temporary name and renamed, so a reader never sees half a report.
Standard library only, so that it runs wherever gpu_check.sh does.
"""
import json
import os
import re
import sys

TAIL_LINES = 25
# Lines worth lifting out of the logs: harness verdicts and throughputs, test totals, sanitizer and ptxas
# summaries, bench ratios.
HIGHLIGHT = re.compile(r"(TFLOP/s|GB/s|cases passed|FAIL|passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|"
                       r"[Ee]rror|device \d+:|spill|Timeout|TimeoutError|\bx\b vs|ratio)")


def read_steps(logs_dir):
    steps = []
    path = os.path.join(logs_dir, "steps.tsv")
    if not os.path.exists(path):
        return steps
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                continue
            name, status, rc, secs, limit, command = parts[:6]
            log = os.path.join(logs_dir, f"{name}.log")
            lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
            steps.append({
                "name": name, "status": status, "rc": rc, "seconds": int(secs) if secs.isdigit() else secs,
                "timeout": limit, "command": command, "log": f"logs/{name}.log (in logs.tar.gz)",
                "tail": lines[-TAIL_LINES:],
                "highlights": [ln for ln in lines if HIGHLIGHT.search(ln)][-40:],
            })
    return steps


def markdown(verdict, elapsed, budget, steps, files):
    md = [f"# pyllm GPU check: {verdict}", "",
          f"Elapsed {elapsed} s of a {budget} s budget. Step logs, JUnit XML and bench JSON: `logs.tar.gz`; "
          f"files here: {', '.join(f'`{f}`' for f in files)}.", "",
          "| step | status | rc | seconds | timeout | command |", "| --- | --- | --- | --- | --- | --- |"]
    for s in steps:
        cmd = s["command"].replace("|", "\\|")
        cmd = cmd if len(cmd) <= 100 else cmd[:97] + "..."
        md.append(f"| {s['name']} | **{s['status']}** | {s['rc']} | {s['seconds']} | {s['timeout']} | `{cmd}` |")
    for s in steps:
        if s["status"] == "running":
            continue
        md += ["", f"## {s['name']}: {s['status']}", ""]
        if s["highlights"] and s["name"] != "env":
            md += ["```", *s["highlights"], "```", ""]
        md += [f"last {TAIL_LINES} lines of {s['log']}:", "", "```", *s["tail"], "```"]
    return "\n".join(md) + "\n"


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    out_dir, logs_dir, verdict, elapsed, budget = sys.argv[1:6]
    steps = read_steps(logs_dir)
    files = sorted(set(os.listdir(out_dir)) | {"report.md", "report.json"})
    files = [f for f in files if not f.endswith(".tmp")]
    write_atomic(os.path.join(out_dir, "report.md"), markdown(verdict, elapsed, budget, steps, files))
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(
        {"verdict": verdict, "elapsed_s": int(elapsed), "budget_s": int(budget), "steps": steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
