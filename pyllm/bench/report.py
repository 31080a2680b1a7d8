"""Showing results: the terminal table, the JSON file, and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
import os


def _clean(x):
    """JSON without NaN/Infinity (strict parsers reject them)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(report: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(report), f, indent=1)
        f.write("\n")
    return path


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- table

def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _mem(b):
    if b is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b} B"


def table(report: dict, width: int = 200) -> str:
    """Plain-text table: one line per (op, mode, shape, dtype, provider); non-ok rows show why."""
    lines = []
    s = report["settings"]
    m = report["machine"]
    where = m.get("gpu") or m.get("cpu")
    lines.append(f"pyllm bench: {s['device']} ({where}), {s['threads']} threads, preset {s['preset']}, "
                 f"torch {m['torch']}, {m['date']}")
    for name, p in report["providers"].items():
        if p["status"] not in ("ok", "not selected"):
            lines.append(f"  {name}: {p['status']} ({p['reason']})")
    lines.append("  work: " + s.get("flops", "") + "; " + s.get("bytes", ""))
    if s.get("limits"):
        lines.append("  %lim: " + s["limits"] + "; a case's roofline time = max(work / matmul peak, bytes / memory "
                     "peak); %lim = roofline time / provider time, above 100% (marked !) is an accounting bug")
    head = (f"{'op':<10} {'mode':<7} {'dtype':<5} {'shape':<24} {'provider':<16} {'median ms':>10} "
            f"{'IQR ms':>15} {'TFLOP/s':>8} {'GB/s':>8} {'%lim':>5} {'faults':>6} {'peak mem':>10} {'vs base':>8} "
            f"{'max':>6}  status")
    lines += [head, "-" * min(width, len(head) + 10)]
    prev = None
    for r in report["results"]:
        key = (r["op"], r["mode"], r["dtype"], r["label"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        t = r.get("time") or {}
        iqr = f"{t['q1_ms']:.3g}-{t['q3_ms']:.3g}" if t else "-"
        frac = r.get("frac_of_roofline")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        if r["status"] == "ok" and not t:
            status = "ok (memory only)"
        pct = "-" if frac is None else f"{100 * frac:.0f}" + ("!" if r.get("over_limit") else "")
        if r.get("over_limit"):
            status += f"; {r.get('accounting', 'accounting bug: above the measured peak')}"
        line = (f"{r['op']:<10} {r['mode']:<7} {r['dtype']:<5} {r['label']:<24} {r['provider']:<16} "
                f"{_fmt(t.get('median_ms'), '.4g'):>10} {iqr:>15} {_fmt(r.get('tflops'), '.3g'):>8} "
                f"{_fmt(r.get('gbps'), '.3g'):>8} {pct:>5} {_fmt(r.get('faults_per_call'), '.0f'):>6} "
                f"{_mem(r.get('peak_bytes')):>10} {_fmt(r.get('speedup'), '.2f'):>8} "
                f"{_fmt(r.get('max_speedup'), '.2f'):>6}  {status}")
        lines.append(line[:width] if len(line) > width else line)
    lines.append("")
    lines.append("median ms with the interquartile range; TFLOP/s of the kept (query, key) pairs only; GB/s of the "
                 "minimal bytes; %lim = % of the case's roofline on this device (the measured matmul and memory peaks: "
                 "read / STREAM copy / add); "
                 "faults = minor page faults per call (CPU; fresh pages, their zeroing is in the time); "
                 "peak mem = extra memory of one call; vs base = baseline time / provider time; max = baseline "
                 "time / roofline time, the most any provider could show here "
                 f"(baselines: {', '.join(f'{k}={v}' for k, v in report.get('baselines', {}).items())}).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots

def _prefer(rows, first, fallback):
    """Rows of the sweeps in ``first`` if there are any, else those of ``fallback``."""
    sel = [r for r in rows if r["sweep"] in first]
    return sel or [r for r in rows if r["sweep"] in fallback]


def _series(rows, x_of, y_of):
    """{provider: sorted [(x, y)]} for rows with a y."""
    out: dict[str, list] = {}
    for r in rows:
        y = y_of(r)
        if y is not None and y > 0:
            out.setdefault(r["provider"], []).append((x_of(r), y))
    return {p: sorted(v) for p, v in out.items()}


def _slope(pts) -> float | None:
    """Least-squares exponent of y ~ x^k over the points (log-log)."""
    if len(pts) < 2:
        return None
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else None


def _colors(rows) -> dict:
    """One colour per provider, the same in every panel and figure."""
    names = list(dict.fromkeys(r["provider"] for r in rows))
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "C7"]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def _adjust(fig, height_in: float, bottom_in: float = 0.6) -> None:
    """Fixed margins and gaps in inches, wide enough for the tick and axis labels (fig.tight_layout costs
    seconds per figure on a busy CPU)."""
    width_in = fig.get_size_inches()[0]
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    ncols, nrows = grid.ncols, grid.nrows
    left, right, top, wgap, hgap = 0.85, 0.15, 0.6, 0.9, bottom_in + 0.5
    ax_w = (width_in - left - right - (ncols - 1) * wgap) / ncols
    ax_h = (height_in - bottom_in - top - (nrows - 1) * hgap) / nrows
    fig.subplots_adjust(left=left / width_in, right=1 - right / width_in, bottom=bottom_in / height_in,
                        top=1 - top / height_in, wspace=wgap / ax_w, hspace=hgap / ax_h)


def _single_shape(rs: list[dict], xname: str) -> bool:
    return len({r["shape"][xname] for r in rs}) <= 1


def plot(report: dict, outdir: str) -> list[str]:
    """Write PNGs into ``outdir``; returns their paths. Figures:

    - ``attention_throughput_<dtype>.png``: TFLOP/s vs seqlen per provider (rows causal, columns modes),
      the dashed grey line is this device's measured peak matmul TFLOP/s; a run of one shape draws one bar
      per provider instead (lines of one point hide each other);
    - ``<norm>_throughput_<dtype>.png``: GB/s vs hidden size (rows residual), dashed line = device memory peak GB/s
      (read / STREAM copy / add);
    - ``attention_memory_<dtype>.png``: peak extra memory vs seqlen, log-log, with the fitted exponent per
      provider in the legend (1 = linear, 2 = quadratic) and guide lines of slope 1 and 2.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    rows = report["results"]
    paths = []
    dev = report["machine"].get("gpu") or report["machine"].get("cpu", "")
    color = _colors(rows)
    for op, sweep, xname, yname, ykey, limkey in (
            ("attention", "seqlen", "Nq", "TFLOP/s", "tflops", "matmul_tflops"),
            ("layer_norm", "hidden", "N", "GB/s", "gbps", "memory_gbps"),
            ("rms_norm", "hidden", "N", "GB/s", "gbps", "memory_gbps")):
        sel = _prefer([r for r in rows if r["op"] == op and r.get("time")], (sweep,), ("user", "decode", "small"))
        for dtype in sorted({r["dtype"] for r in sel}):
            fig = throughput_figure(plt, [r for r in sel if r["dtype"] == dtype], op, (xname, yname, ykey, limkey),
                                    color, f"{op} throughput on {dev}")
            if fig is None:
                continue
            path = os.path.join(outdir, f"{op}_throughput_{dtype}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    paths += _plot_memory(rows, outdir, dev, plt, color)
    paths += _plot_sweep(rows, outdir, dev, plt, color)
    return paths


# (title, op, sweep, x dim, x label, modes): the panels of the size-sweep figure (``--preset sweep``)
_SWEEP_PANELS = (
    ("attention decode (Nq=1), fwd", "attention", "sweep-decode", "Nk", "keys Nk", ("fwd",)),
    ("attention prefill (Nq=Nk, causal), fwd", "attention", "sweep-seq", "Nq", "sequence length", ("fwd",)),
    ("attention training (causal), fwd+bwd", "attention", "sweep-seq", "Nq", "sequence length", ("fwd+bwd",)),
    ("layer_norm (hidden 768)", "layer_norm", "sweep-rows", "M", "rows", ("fwd", "fwd+bwd")),
    ("rms_norm (hidden 768)", "rms_norm", "sweep-rows", "M", "rows", ("fwd", "fwd+bwd")),
)


# Ratio ticks for a log-scale y axis: powers of 2 alone leave a panel spanning 1x-1.9x with one labelled tick;
# the finer sets serve narrower ranges (ticks stay far enough apart to be read).
_RATIO_TICKS = ((3.5, (0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3)),
                (16, (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12)),
                (float("inf"), (0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)))


def _ratio_ticks(ax) -> None:
    """Label the y axis of a ratio panel at round ratios inside its range (a set as fine as the range allows;
    three more points across it when fewer than three fall inside), no minor labels."""
    from matplotlib.ticker import FixedLocator, NullFormatter

    lo, hi = ax.get_ylim()
    ticks = [t for t in next(ts for span, ts in _RATIO_TICKS if hi / lo <= span) if lo <= t <= hi]
    if len(ticks) < 3:  # a narrow range: three points spread across it (log-evenly), to three digits
        ticks = sorted(set(ticks) | {float(f"{lo * (hi / lo) ** (k / 4):.3g}") for k in (1, 2, 3)})
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_sweep(rows, outdir, dev, plt, color) -> list[str]:
    """``sweep_ratio_<dtype>.png``: each pyllm kernel provider's speed ratio to the baseline (torch) from the
    smallest size to the largest, one panel per kind of call, log scale, the line y = 1 where torch is equal.
    Above the line pyllm is faster; below, slower. The dotted black line is the roofline bound (baseline time /
    the case's roofline time): no kernel can be above it on this machine. The reference is left out (it is the
    check, not a kernel)."""
    sel = [r for r in rows if r["sweep"].startswith("sweep-") and r.get("speedup")
           and r["provider"] not in (r["baseline"], "pyllm-reference")]
    paths = []
    for dtype in sorted({r["dtype"] for r in sel}):
        panels = [p for p in _SWEEP_PANELS
                  if any(r["op"] == p[1] and r["sweep"] == p[2] and r["dtype"] == dtype for r in sel)]
        if not panels:
            continue
        from matplotlib.ticker import FuncFormatter

        ncols = min(3, len(panels))
        nrows = -(-len(panels) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (title, op, sweep, xdim, xlabel, modes) in zip(axes.flat, panels):
            for mode, style in zip(modes, ("-", "--")):
                sub = [r for r in sel if r["op"] == op and r["sweep"] == sweep and r["dtype"] == dtype
                       and r["mode"] == mode]
                for prov, pts in _series(sub, lambda r: r["shape"][xdim], lambda r: r["speedup"]).items():
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=color[prov],
                            label=prov + (f" {mode}" if len(modes) > 1 else ""))
                # the case's roofline bound (the same for every provider): the most any kernel could show here
                bound = sorted({r["shape"][xdim]: r["max_speedup"] for r in sub if r.get("max_speedup")}.items())
                if bound:
                    ax.plot([x for x, _ in bound], [y for _, y in bound], {"-": ":", "--": "-."}[style],
                            color="black", linewidth=1.2, label="roofline bound" + (f" {mode}" if len(modes) > 1 else ""))
            ax.axhline(1.0, color="grey", linewidth=1, label="torch (= 1)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            _ratio_ticks(ax)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.set_title(f"{title} {dtype}", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("speed vs torch (x)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.suptitle(f"pyllm / torch speed ratio across sizes on {dev} (> 1: pyllm faster)", fontsize=10)
        _adjust(fig, 3.6 * nrows)
        path = os.path.join(outdir, f"sweep_ratio_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def throughput_figure(plt, rs: list[dict], op: str, keys: tuple, color: dict, title: str):
    """One dtype's throughput figure (rows: causal or residual; columns: modes), or None without rows."""
    flag = "causal" if op == "attention" else "residual"
    flags = sorted({r[flag] for r in rs})
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rs)]
    if not modes:
        return None
    single = _single_shape(rs, keys[0])
    height = 3.6 + (0.5 if single else 0.0)
    fig, axes = plt.subplots(len(flags), len(modes), figsize=(4.8 * len(modes), height * len(flags)), squeeze=False)
    for i, fl in enumerate(flags):
        for j, mode in enumerate(modes):
            sub = [r for r in rs if r[flag] == fl and r["mode"] == mode]
            panel = _bars_panel if single else _throughput_panel
            panel(axes[i][j], sub, op, keys, color,
                  f"{op} {mode} {rs[0]['dtype']}" + (f" {flag}" if fl else ""))
    fig.suptitle(title, fontsize=10)
    _adjust(fig, height * len(flags), bottom_in=1.1 if single else 0.6)
    return fig


def _bars_panel(ax, sub: list[dict], op: str, keys: tuple, color: dict, title: str) -> None:
    """Shapes that share the x value (one shape, or decode steps all at Nq=1): a group of bars per shape, a
    bar per provider in it (every one visible), the device limit as a dashed horizontal line."""
    _, yname, ykey, limkey = keys
    labels = list(dict.fromkeys(r["label"] for r in sub))
    provs = list(dict.fromkeys(r["provider"] for r in sub if r.get(ykey)))
    width = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        pts = [(labels.index(r["label"]) + (j - (len(provs) - 1) / 2) * width, r[ykey])
               for r in sub if r["provider"] == p and r.get(ykey)]
        ax.bar([x for x, _ in pts], [y for _, y in pts], width=width, color=color[p], label=p)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)
    lim = [r[limkey] for r in sub if r.get(limkey)]
    if lim:
        ax.axhline(max(lim), linestyle="--", color="grey", label="matmul peak" if op == "attention" else "memory peak")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(yname)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _throughput_panel(ax, sub: list[dict], op: str, keys: tuple, color: dict, title: str) -> None:
    """One panel: a line per provider of ``ykey`` against the shape dim ``xname``, the device limit dashed."""
    xname, yname, ykey, limkey = keys
    for prov, pts in _series(sub, lambda r: r["shape"][xname], lambda r: r.get(ykey)).items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=prov, color=color[prov])
    lim = sorted({(r["shape"][xname], r[limkey]) for r in sub if r.get(limkey)})
    if lim:
        ax.plot([x for x, _ in lim], [y for _, y in lim], "--", color="grey",
                label="matmul peak" if op == "attention" else "memory peak")
    ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("seqlen" if op == "attention" else "hidden size")
    ax.set_ylabel(yname)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_memory(rows, outdir, dev, plt, color) -> list[str]:
    sel = _prefer([r for r in rows if r["op"] == "attention" and r.get("peak_bytes") and not r["padding"]],
                  ("seqlen", "memory"), ("user",))
    paths = []
    for dtype in sorted({r["dtype"] for r in sel}):
        rs = [r for r in sel if r["dtype"] == dtype]
        order = ("fwd", "bwd", "fwd+bwd")
        panels = sorted({(r["mode"], r["causal"]) for r in rs}, key=lambda t: (order.index(t[0]), t[1]))
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
        for ax, (mode, causal) in zip(axes[0], panels):
            sub = [r for r in rs if r["mode"] == mode and r["causal"] == causal]
            series = _series(sub, lambda r: r["shape"]["Nq"], lambda r: r["peak_bytes"] / 2**20)
            for prov, pts in series.items():
                k = _slope(pts)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=color[prov],
                        label=f"{prov}" + (f" (~N^{k:.1f})" if k is not None else ""))
            allpts = [p for pts in series.values() for p in pts]
            if allpts:
                x0 = min(x for x, _ in allpts)
                x1 = max(x for x, _ in allpts)
                y0 = sorted(y for x, y in allpts if x == x0)[0]
                for power, style in ((1, ":"), (2, "-.")):
                    ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** power], style, color="grey", linewidth=1,
                            label=f"slope {power} ({'linear' if power == 1 else 'quadratic'})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"attention {mode} {dtype}" + (" causal" if causal else ""), fontsize=9)
            ax.set_xlabel("seqlen")
            ax.set_ylabel("peak extra memory (MiB)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"attention peak memory on {dev}", fontsize=10)
        _adjust(fig, 3.8)
        path = os.path.join(outdir, f"attention_memory_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------ ratios, markdown

def _case_groups(rows):
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["dtype"], r["label"]), []).append(r)
    return groups


def report_ratios(report: dict) -> str:
    """One line per timed case: each provider's speed ratio to the baseline (> 1 = faster)."""
    lines = ["speed vs baseline (baseline time / provider time; > 1 = faster), measured side by side:"]
    for (op, mode, dtype, label), rs in _case_groups(report["results"]).items():
        timed = [r for r in rs if r.get("speedup") is not None and r["provider"] != r["baseline"]]
        wrong = [r["provider"] for r in rs if r["status"] == "WRONG"]
        if not timed and not wrong:
            continue
        parts = [f"{r['provider']} {r['speedup']:.2f}x" for r in timed] + [f"{p} WRONG" for p in wrong]
        lines.append(f"  {op} {mode} {label} {dtype} (vs {rs[0]['baseline']}): " + ", ".join(parts))
    return "\n".join(lines)


def _cell(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    t = r.get("time")
    if not t:
        return "-"
    s = f"{t['median_ms']:.3g} ms"
    if r.get("tflops") is not None:
        s += f", {r['tflops']:.3g} TF/s"
    elif r.get("gbps") is not None:
        s += f", {r['gbps']:.3g} GB/s"
    if r.get("speedup") is not None and r["provider"] != r["baseline"]:
        s += f", **{r['speedup']:.2f}x**"
    return s


def markdown(report: dict, images: list[str] = ()) -> str:
    """README results section: machine line, one table per op (rows = cases, columns = providers),
    a memory table for attention, and the plots (``images``: paths relative to the README)."""
    m, s = report["machine"], report["settings"]
    where = (f"{m.get('gpu')} (driver {m.get('gpu_driver')})" if m.get("gpu")
             else f"{m.get('cpu')}, {s['threads']} threads")
    out = [f"Measured {m['date'][:10]} on {where}; torch {m['torch']}, triton {m.get('triton')}, "
           f"python {m['python']}; preset `{s['preset']}`. Cells: median time, throughput "
           f"(TFLOP/s by FlashAttention's count, or GB/s of the minimal bytes) and **speed vs the baseline** "
           f"({', '.join(f'{k}: `{v}`' for k, v in report.get('baselines', {}).items())}). Every provider was checked "
           "against `pyllm.reference` first; WRONG means it failed and was not timed.", ""]
    rows = report["results"]
    for op in dict.fromkeys(r["op"] for r in rows):
        rs = [r for r in rows if r["op"] == op and r.get("time") or (r["op"] == op and r["status"] != "ok")]
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        if not rs:
            continue
        out += [f"**{op}**", "", "| mode | shape | dtype | " + " | ".join(f"`{p}`" for p in provs) + " |",
                "|---|---|---|" + "---|" * len(provs)]
        for (o, mode, dtype, label), g in _case_groups(rs).items():
            by = {r["provider"]: r for r in g}
            cells = " | ".join(_cell(by[p]) if p in by else "" for p in provs)
            out.append(f"| {mode} | {label} | {dtype} | {cells} |")
        out.append("")
    mem = [r for r in rows if r["op"] == "attention" and r.get("peak_bytes") and r["sweep"] in ("memory", "seqlen")
           and r["mode"] == "fwd+bwd" and not r["padding"]]
    if mem:
        provs = list(dict.fromkeys(r["provider"] for r in mem))
        out += ["**attention peak extra memory, fwd+bwd (MiB)**", "",
                "| shape | dtype | " + " | ".join(f"`{p}`" for p in provs) + " |", "|---|---|" + "---|" * len(provs)]
        for (o, mode, dtype, label), g in _case_groups(mem).items():
            by = {r["provider"]: r for r in g}
            out.append(f"| {label} | {dtype} | " + " | ".join(
                f"{by[p]['peak_bytes'] / 2**20:.1f}" if p in by else "skipped" for p in provs) + " |")
        out.append("")
    for img in images:
        out += [f"![{os.path.splitext(os.path.basename(img))[0]}]({img})", ""]
    return "\n".join(out).rstrip() + "\n"


def run_script(name: str, cases, args, device: str) -> int:
    """The body shared by the fixed comparisons in benchmarks/: run, print the table and ratios, write JSON
    and plots when asked. Returns the exit code (2 bad arguments, 1 a provider WRONG or failed, else 0)."""
    import sys

    from pyllm.bench import runner, spec

    try:
        threads = args.threads or (1 if args.quick and device == "cpu" else None)  # tiny shapes: 1 thread is steadier
        report = runner.run(cases, device=device, preset="quick" if args.quick else "default", threads=threads,
                            memory=not args.no_memory)
    except spec.BenchError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    if args.plots:
        report["plots"] = plot(report, args.plots)
    print(table(report))
    print()
    print(report_ratios(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 1 if any(r["status"] in ("WRONG", "error") for r in report["results"]) else 0
