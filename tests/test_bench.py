"""pyllm.bench on tiny shapes: report schema, WRONG providers never timed, bad arguments, plots, CLI.

Everything runs with one thread and a few short rounds; the `pyllm bench --quick` run is marked slow.
"""
import argparse
import ast
import json
import os
import sys

import pytest
import torch

from pyllm import bench
from pyllm.bench import cli, providers, runner
from pyllm.bench.spec import BenchError, Case, build_cases, bytes_moved, parse_shape

FAST = dict(threads=1, repeats=3, warmup=1, max_s=0.05)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attn(mode, N=64, causal=False, **kw):
    return Case(op="attention", mode=mode, dtype="fp32", dims=(1, 2, 2, N, N, 16), causal=causal, **kw)


def norm(op, mode, residual=False):
    return Case(op=op, mode=mode, dtype="fp32", dims=(32, 64), residual=residual, sweep="hidden")


class ScaledSDPA(providers.SDPAProvider):
    """Deliberately wrong: SDPA's output times 1.05."""

    def __init__(self):
        super().__init__("wrong-sdpa", None)

    def attention_fn(self, case, q, k, v, mask, scale):
        fn = super().attention_fn(case, q, k, v, mask, scale)
        return lambda: fn() * 1.05


class _BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 2  # right values, wrong gradient


class WrongGradNorm(providers.TorchNorm):
    name = "wrong-grad-norm"

    def norm_fn(self, case, x, w, b, r, eps):
        fn = super().norm_fn(case, x, w, b, r, eps)

        def wrong():
            out = fn()
            return (_BadGrad.apply(out[0]),) + out[1:] if isinstance(out, tuple) else _BadGrad.apply(out)
        return wrong


@pytest.fixture(scope="module")
def report():
    cases = [attn(m) for m in ("fwd", "bwd", "fwd+bwd")] + [norm("layer_norm", m, r) for m in ("fwd", "fwd+bwd")
                                                              for r in (False, True)]
    cases.append(norm("rms_norm", "fwd+bwd"))
    return bench.run(cases, providers=["sdpa", "eager", "torch", "pyllm-reference"], memory=False,
                     extra_providers=[ScaledSDPA(), WrongGradNorm(), NoBackwardSDPA()], log=lambda s: None, **FAST)


def test_report_schema(report, tmp_path):
    assert report["schema"] == bench.SCHEMA
    m = report["machine"]
    for key in ("cpu", "cpu_count", "threads", "torch", "triton", "python", "date", "device"):
        assert key in m
    assert m["threads"] == 1 and report["settings"]["threads"] == 1
    assert report["settings"]["timer"].startswith("torch.utils.benchmark.Timer(num_threads=1)")
    assert report["baselines"]["attention"] == "sdpa"
    assert report["providers"]["flash_attn"]["status"] == "not selected"
    _, table = providers.select(None, ["attention", "layer_norm"], "cpu")
    for peer in ("flash_attn", "xformers", "liger_kernel", "apex"):
        assert table[peer]["status"] in ("not installed", "unavailable")  # CUDA-only peers, never on CPU
    for r in report["results"]:
        for key in ("op", "mode", "dtype", "shape", "label", "provider", "status", "reason", "check", "time",
                    "tflops", "gbps", "peak_bytes", "speedup", "baseline"):
            assert key in r, key
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"sdpa", "eager", "torch", "pyllm-reference"}
    for r in ok:
        t = r["time"]
        assert t["n"] >= 3 and 0 < t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] <= t["max_ms"]
        assert r["check"]["passed_out"]
        if r["op"] == "attention":
            assert r["tflops"] > 0 and r["frac_of_matmul"] > 0 and r["matmul_n"] >= 128
        assert r["gbps"] > 0 and r["frac_of_memory"] > 0 and r["memory_gbps"] > 0
        # the roofline: the slower of the two bounds; %lim is the larger fraction
        fracs = [x for x in (r.get("frac_of_matmul"), r["frac_of_memory"]) if x is not None]
        assert r["frac_of_roofline"] == pytest.approx(max(fracs))
        assert r["roofline_ms"] == pytest.approx(r["frac_of_roofline"] * t["median_ms"])
        base = next(b for b in ok if b["provider"] == r["baseline"] and runner._rkey(b) == runner._rkey(r))
        assert r["max_speedup"] == pytest.approx(base["time"]["median_ms"] / r["roofline_ms"])
        if r["provider"] == r["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)
            assert r["max_speedup"] == pytest.approx(1 / r["frac_of_roofline"])
    path = bench.write_json(report, str(tmp_path / "b.json"))
    text = open(path).read()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert bench.load_json(path)["results"][0]["provider"] == report["results"][0]["provider"]


def test_wrong_provider_is_flagged_and_not_timed(report):
    rows = [r for r in report["results"] if r["provider"] == "wrong-sdpa"]
    assert len(rows) == 3
    for r in rows:
        assert r["status"] == "WRONG" and "out" in r["reason"]
        assert r["time"] is None and r["tflops"] is None and r["speedup"] is None
    grad = {(r["mode"], r["residual"]): r for r in report["results"] if r["provider"] == "wrong-grad-norm"}
    for res in (False, True):
        assert grad[("fwd", res)]["status"] == "ok" and grad[("fwd", res)]["time"] is not None  # forward is right
        assert grad[("fwd+bwd", res)]["status"] == "WRONG" and grad[("fwd+bwd", res)]["time"] is None
    grad = {r["mode"]: r for r in report["results"] if r["provider"] == "wrong-grad-norm" and not r["residual"]}
    assert grad["fwd"]["status"] == "ok" and grad["fwd"]["time"] is not None  # forward is right
    assert grad["fwd+bwd"]["status"] == "WRONG" and grad["fwd+bwd"]["time"] is None
    assert "dx" in grad["fwd+bwd"]["reason"]
    assert "WRONG" in bench.table(report) and "wrong-sdpa WRONG" in bench.report_ratios(report)


def test_plots_and_memory(tmp_path):
    cases = [attn(m, N=n, sweep="seqlen") for n in (256, 512) for m in ("fwd", "fwd+bwd")]
    cases += [norm("layer_norm", "fwd")]
    rep = bench.run(cases, providers=["sdpa", "eager", "torch"], memory=True, log=lambda s: None, **FAST)
    assert "VmHWM" in rep["settings"]["memory"]
    mem = {(r["provider"], r["shape"]["Nq"], r["mode"]): r["peak_bytes"]
           for r in rep["results"] if r["op"] == "attention"}
    assert all(v is not None for v in mem.values()), mem
    # the eager path forms the (N x N) scores: 2 heads x 512^2 x 4 bytes = 2 MiB at least
    assert mem[("eager", 512, "fwd")] >= 2 * 2**20 > mem[("sdpa", 512, "fwd")]
    paths = bench.plot(rep, str(tmp_path / "plots"))
    names = {os.path.basename(p) for p in paths}
    assert {"attention_throughput_fp32.png", "attention_memory_fp32.png", "layer_norm_throughput_fp32.png"} <= names
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, needle", [
    (["--op", "attn"], "--op"),
    (["--provider", "nope"], "unknown provider"),
    (["--shape", "1,6,64,32,4"], "multiple of kv heads"),
    (["--shape", "1,-2,64,32"], "positive"),
    (["--shape", "1,2,3,4,5,6"], "expected 4 or 5 numbers"),  # 3 numbers are a linear_cross_entropy shape
    (["--shape", "a,b"], "integers"),
    (["--dtype", "fp8"], "--dtype"),
    (["--threads", "0"], "--threads"),
    (["--preset", "huge"], "--preset"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    parser = argparse.ArgumentParser(prog="pyllm")
    cli.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["bench", "--device", "cpu"] + argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "pyllm bench: error:" in err and needle in err


def test_shape_parsing_and_presets():
    assert parse_shape("4,8,1024,64", ["attention"]) == ("attention", (4, 8, 8, 1024, 1024, 64))
    assert parse_shape("2,8,128,64,2", ["attention"]) == ("attention", (2, 8, 2, 128, 128, 64))
    assert parse_shape("4096x768", ["layer_norm"]) == ("norm", (4096, 768))
    assert parse_shape("train_step=2,64", ["train_step"]) == ("train_step", (2, 64))
    with pytest.raises(BenchError):
        parse_shape("0,4", ["layer_norm"])
    for preset in ("quick", "default", "long"):
        for device in ("cpu", "cuda"):
            cases = build_cases(["attention", "layer_norm", "rms_norm", "train_step"], ["fwd", "bwd", "fwd+bwd"],
                                None, preset, device)
            sweeps = {c.sweep for c in cases if c.op == "attention"}
            assert {"seqlen", "gqa", "padding"} <= sweeps
            assert any(c.causal for c in cases) and any(c.residual for c in cases)
    f = bench.flops(Case(op="attention", mode="fwd+bwd", dtype="bf16", dims=(2, 4, 4, 128, 128, 64), causal=True))
    # issue 15: the causal count is the exact kept pairs, 128 * 129 / 2 per head (was the approximation N^2 / 2)
    assert f == pytest.approx(4 * 2 * 4 * (128 * 129 // 2) * 64 * 3.5)


def _dense_pairs(case, mask):
    """Kept (query, key) pairs counted from an explicit (B, Nq, Nk) boolean matrix: the test's own oracle."""
    B, _, _, Nq, Nk, _ = case.dims
    keep = torch.ones(B, Nq, Nk, dtype=torch.bool)
    if case.causal:
        keep &= torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    if mask is not None:
        keep &= mask[:, None, :]
    return int(keep.sum())


@pytest.mark.parametrize("dims, causal", [((3, 2, 2, 7, 13, 8), False), ((3, 2, 1, 7, 13, 8), True),
                                           ((4, 3, 3, 13, 7, 16), True), ((1, 2, 2, 9, 9, 8), True),
                                           ((2, 2, 2, 1, 17, 8), False)])
@pytest.mark.parametrize("padding", [False, True])
def test_flops_and_bytes_count_only_kept_pairs(dims, causal, padding):
    from pyllm import accuracy
    from pyllm.bench.spec import bytes_moved, kept_pairs

    case = Case(op="attention", mode="fwd", dtype="fp32", dims=dims, causal=causal, padding=padding)
    B, Hq, Hkv, Nq, Nk, D = dims
    mask = accuracy.padding_mask(B, Nk, min_keys=1) if padding else None
    lens = mask.sum(-1).tolist() if padding else None
    pairs = _dense_pairs(case, mask)
    assert kept_pairs(case, lens) == pairs
    for mode, k in (("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)):
        assert bench.flops(case.with_(mode=mode), lens) == pytest.approx(4 * Hq * D * pairs * k)
    real = sum(lens) if padding else B * Nk
    q, kv = B * Nq * Hq * D, B * Nk * Hkv * D
    assert bytes_moved(case, lens) == 4 * (2 * q + 2 * real * Hkv * D)
    assert bytes_moved(case.with_(mode="bwd"), lens) == 4 * (4 * q + 2 * real * Hkv * D + 2 * kv) + 4 * B * Hq * Nq
    if padding:
        if B > 1:  # row 0 keeps every key; the others are padded, and padded keys are not credited
            assert pairs < kept_pairs(case.with_(padding=False))
        with pytest.raises(ValueError, match="key_lens"):
            bench.flops(case)


def test_roofline_torch_matmul_within_peak():
    """torch.mm at one of the tuned sizes, timed apart from the peak measurement, reaches at most the peak
    (bounds wide enough for a loaded 2-core machine: the test checks the accounting, not the speed)."""
    import statistics
    import time

    from pyllm.bench.measure import Limits

    lim = Limits("cpu", 1, repeats=3, sizes=(128, 256), stream_numel=1 << 18, max_s=0.3)
    peak, n = lim.matmul_peak(torch.float32)
    assert n in (128, 256) and peak > 0 and set(lim.matmul) == {("torch.float32", 128), ("torch.float32", 256)}
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    ts, saved = [], torch.get_num_threads()
    torch.set_num_threads(1)  # the peak's thread count: the roofline is per thread count
    try:
        for _ in range(15):
            t = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(saved)
    ratio = 2 * 256 ** 3 / statistics.median(ts) / 1e12 / peak
    assert 0.1 < ratio <= 1.3, ratio
    # the memory peak is the best of a read, STREAM's copy and add, at the case's size and at stream_numel
    peak_mem = lim.memory_peak(torch.float32, 6 * 4096 * 4)  # each probe moves these bytes
    each = [f(torch.float32, n) for f, k in ((lim.read_gbps, 1), (lim.copy_gbps, 2), (lim.add_gbps, 3))
            for n in (6 * 4096 // k, 1 << 18)]
    assert min(each) > 0 and peak_mem == max(each)
    assert set(lim.read) == {("torch.float32", 6 * 4096), ("torch.float32", 1 << 18)}
    assert set(lim.add) == {("torch.float32", 2 * 4096), ("torch.float32", 1 << 18)}
    assert "torch.mm" in lim.describe() and "STREAM" in lim.describe() and "add" in lim.describe()
    assert "a.sum()" in lim.describe()
    assert {"matmul", "read", "copy", "add"} <= set(lim.to_json())
    # on a GPU the header names the device, not the CPU threads (the H200 run said "16 threads", 2026-11-30)
    assert "this cuda device" in Limits("cuda", 16).describe()


def test_ratio_above_peak_is_flagged():


    class TinyPeak:
        def matmul_peak(self, dtype):
            return 1e-9, 128

        def memory_peak(self, dtype, nbytes):
            return 1e9

    case = attn("fwd")
    t = {"median_ms": 1.0, "q1_ms": 1.0, "q3_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "n": 3}
    row = {"status": "ok"}
    runner._figures(row, case, t, TinyPeak())
    assert row["over_limit"] and "accounting bug" in row["accounting"]
    ok = {"status": "ok"}
    runner._figures(ok, norm("layer_norm", "fwd"), t, TinyPeak())
    assert ok["frac_of_memory"] < 1 and not ok["over_limit"]


def test_roofline_is_the_slower_bound_and_caps_the_ratio():
    """The roofline time of a case is max(FLOPs / matmul peak, bytes / memory peak), the memory peak measured
    for the case's bytes; max_speedup = baseline time / roofline time."""

    from pyllm.bench.spec import bytes_moved, flops

    class Peaks:
        def __init__(self, tflops, gbps):
            self.tflops, self.gbps, self.numels = tflops, gbps, []

        def matmul_peak(self, dtype):
            return self.tflops, 256

        def memory_peak(self, dtype, nbytes):
            self.numels.append(nbytes)
            return self.gbps

    case = attn("fwd")
    f, b = flops(case), bytes_moved(case)
    t = lambda ms: {"median_ms": ms, "q1_ms": ms, "q3_ms": ms, "min_ms": ms, "max_ms": ms, "n": 3}  # noqa: E731
    for tflops, gbps in ((1e-3, 1e6), (1e6, 1e-3), (0.05, 20.0)):
        lim = Peaks(tflops, gbps)
        row = {"status": "ok"}
        runner._figures(row, case, t(1e6), lim)  # a slow provider: far under either bound
        want = 1e3 * max(f / (tflops * 1e12), b / (gbps * 1e9))
        assert row["roofline_ms"] == pytest.approx(want)
        assert row["frac_of_roofline"] == pytest.approx(want / 1e6)
        assert row["frac_of_roofline"] == pytest.approx(max(row["frac_of_matmul"], row["frac_of_memory"]))
        assert lim.numels == [pytest.approx(b)]
    # a memory-bound case run faster than its byte count allows is flagged, though far under the matmul peak
    fast = {"status": "ok"}
    runner._figures(fast, case, t(0.5 * 1e3 * b / 1e9), Peaks(1e6, 1.0))
    assert fast["over_limit"] and fast["frac_of_matmul"] < 1e-3
    rows = []
    for prov, ms in (("sdpa", 4.0), ("pyllm-cpu", 2.0)):
        r = {"status": "ok", "op": "attention", "mode": "fwd", "dtype": "fp32", "shape": {"B": 1}, "causal": False,
             "padding": False, "residual": False, "provider": prov}
        runner._figures(r, case, t(ms), Peaks(1e6, b / 1e6))  # roofline: the bytes in 1 ms
        rows.append(r)
    runner._ratios(rows)
    assert [r["speedup"] for r in rows] == [pytest.approx(1.0), pytest.approx(2.0)]
    assert [r["max_speedup"] for r in rows] == [pytest.approx(4.0)] * 2


def test_decode_and_small_presets():
    dec = build_cases(["attention", "layer_norm", "rms_norm", "train_step"], None, None, "decode", "cpu")
    assert {(c.dims, c.dtype, c.mode) for c in dec} == {
        ((B, 12, 12, 1, nk, 64), dt, "fwd") for B, nk in ((1, 128), (1, 1024), (8, 512)) for dt in ("fp32", "bf16")}
    small = build_cases(["attention", "layer_norm", "rms_norm", "train_step"], None, None, "small", "cpu")
    norms = {(c.op, c.dims, c.mode) for c in small if c.op != "attention"}
    assert norms == {(op, (m, 768), md) for op in ("layer_norm", "rms_norm") for m in (16, 128)
                     for md in ("fwd", "fwd+bwd")}
    assert {c.dims for c in small if c.op == "attention"} == {(1, 12, 12, 16, 16, 64)}
    assert build_cases(["attention"], ["bwd"], None, "decode", "cpu")[0].mode == "bwd"  # --mode wins


def test_sweep_preset_and_its_ratio_plot(tmp_path, monkeypatch):
    from pyllm.bench import report as R
    from pyllm.bench.spec import SWEEP_DECODE_NK, SWEEP_ROWS, SWEEP_SEQ

    cases = build_cases(["attention", "layer_norm"], None, None, "sweep", "cpu")
    decode = [c for c in cases if c.sweep == "sweep-decode"]
    seq = [c for c in cases if c.sweep == "sweep-seq"]
    assert {(c.dims[4], c.mode) for c in decode} == {(nk, "fwd") for nk in SWEEP_DECODE_NK}  # inference only
    assert {(c.dims[3], c.mode, c.causal) for c in seq} == {(n, m, True) for n in SWEEP_SEQ for m in ("fwd", "fwd+bwd")}
    assert {c.dims[0] for c in cases if c.op == "layer_norm"} == set(SWEEP_ROWS)
    assert {c.dtype for c in cases} == {"fp32", "bf16"}
    rows = [{"op": c.op, "mode": c.mode, "dtype": c.dtype, "sweep": c.sweep, "padding": False, "label": c.label(),
             "shape": dict(zip(("B", "Hq", "Hkv", "Nq", "Nk", "D") if c.op == "attention" else ("M", "N"), c.dims)),
             "provider": p, "baseline": "sdpa" if c.op == "attention" else "torch", "speedup": s, "max_speedup": 2.5}
            for c in cases for p, s in (("pyllm-cpu", 1.5), ("pyllm-reference", 0.3),
                                        ("sdpa" if c.op == "attention" else "torch", 1.0))]
    import matplotlib.pyplot as plt

    closed, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (closed.append(fig), close(fig)))
    paths = R.plot({"results": rows, "machine": {"cpu": "test cpu"}}, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths if "sweep" in p) == ["sweep_ratio_bf16.png", "sweep_ratio_fp32.png"]
    # every sweep panel draws the roofline bound (the most any kernel could show) beside the providers' ratios
    sweep_figs = [f for f in closed if f is not None and "speed ratio across sizes" in f._suptitle.get_text()]
    assert len(sweep_figs) == 2
    for fig in sweep_figs:
        for ax in (a for a in fig.axes if a.get_visible()):
            bound = [ln for ln in ax.get_lines() if ln.get_label().startswith("roofline bound")]
            assert bound and all(set(ln.get_ydata()) == {2.5} for ln in bound)


@pytest.mark.parametrize("ys", [(1.0, 1.9), (0.5, 1.05), (1.0, 24.0), (0.98, 1.03)])
def test_ratio_panels_label_at_least_three_ticks_inside_the_range(ys):
    """A sweep panel spanning 1x-1.9x had one labelled tick (powers of 2 on a log axis); now every range gets
    at least three, inside it, and wide ranges stay readable (no more than a dozen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyllm.bench import report as R

    fig, ax = plt.subplots()
    ax.plot([1, 2], list(ys))
    ax.set_yscale("log", base=2)
    R._ratio_ticks(ax)
    lo, hi = ax.get_ylim()
    ticks = list(ax.yaxis.get_major_locator()())
    assert 3 <= len(ticks) <= 12 and all(lo <= t <= hi for t in ticks), (ys, ticks)
    plt.close(fig)


def test_single_shape_plot_shows_every_provider_unclipped():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyllm.bench import report as R

    rows = [{"op": "attention", "mode": m, "dtype": "fp32", "causal": False, "label": label,
             "shape": {"Nq": 1}, "provider": p, "tflops": 0.01 + 0.001 * i, "matmul_tflops": 0.1}
            for m in ("fwd", "fwd+bwd") for i, p in enumerate(("sdpa", "pyllm-cpu", "eager"))
            for label in ("B1 H12 N1:128 D64", "B8 H12 N1:512 D64")]  # decode steps: the same Nq, two shapes
    fig = R.throughput_figure(plt, rows, "attention", ("Nq", "TFLOP/s", "tflops", "matmul_tflops"),
                              R._colors(rows), "attention throughput")
    fig.canvas.draw()
    box = fig.bbox
    for ax in fig.axes:
        assert len(ax.patches) == 6  # a bar per provider and shape
        assert {t.get_text() for t in ax.get_xticklabels()} == {"B1 H12 N1:128 D64", "B8 H12 N1:512 D64"}
        for text in [ax.xaxis.label, ax.yaxis.label, ax.title] + ax.get_xticklabels() + ax.get_yticklabels():
            if text.get_text():
                e = text.get_window_extent()
                assert e.x0 >= 0 and e.y0 >= 0 and e.x1 <= box.x1 and e.y1 <= box.y1, text.get_text()
    plt.close(fig)


def test_triton_excluded_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, table = providers.select(None, ["attention"], "cpu")
    row = table["pyllm-triton"]
    if row["status"] == "unavailable" and "pyllm" in row["reason"]:
        pytest.skip(row["reason"])
    assert row["status"] == "excluded" and "interpreter" in row["reason"]


def test_cli_module_imports_only_stdlib():
    tree = ast.parse(open(cli.__file__).read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert all(n.split(".")[0] in sys.stdlib_module_names or n == "__future__" for n in names), names
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in top)


def test_update_readme(report, tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import update_readme
    finally:
        sys.path.pop(0)
    js = bench.write_json(report, str(tmp_path / "r.json"))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold results\n<!-- bench:end -->\noutro\n")
    assert update_readme.main([js, "--readme", str(readme), "--img-dir", str(tmp_path / "img")]) == 0
    text = readme.read_text()
    assert "old results" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| mode | shape | dtype |" in text and "WRONG" in text
    plain = tmp_path / "NOMARK.md"
    plain.write_text("no markers\n")
    assert update_readme.main([js, "--readme", str(plain)]) == 0
    assert plain.read_text() == "no markers\n" and "| mode | shape | dtype |" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_quick(tmp_path):
    """`pyllm bench --quick` end to end (about a minute on a loaded 2-core machine)."""
    parser = argparse.ArgumentParser(prog="pyllm")
    cli.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "--quiet"])
    rc = args.func(args)
    rep = bench.load_json(str(tmp_path / "bench.json"))
    bad = [(r["provider"], r["op"], r["mode"], r["label"], r["reason"]) for r in rep["results"]
           if r["status"] in ("WRONG", "error")]
    assert rc == (1 if bad else 0)
    assert {r["op"] for r in rep["results"]} >= {"attention", "layer_norm", "rms_norm"}
    assert all(os.path.isfile(p) for p in rep["plots"]) and rep["plots"]
    assert not [b for b in bad if b[0] in ("sdpa", "eager", "torch")], bad


class NoBackwardSDPA(providers.SDPAProvider):
    """Right forward, no backward at all (an inference-only kernel)."""

    def __init__(self):
        super().__init__("fwd-only-sdpa", None)

    def attention_fn(self, case, q, k, v, mask, scale):
        fn = super().attention_fn(case, q, k, v, mask, scale)
        return lambda: fn().detach().requires_grad_(False) * 1


def test_forward_only_provider_times_forward(report):
    rows = {r["mode"]: r for r in report["results"] if r["provider"] == "fwd-only-sdpa"}
    assert rows["fwd"]["status"] == "ok" and rows["fwd"]["time"] is not None
    assert rows["bwd"]["status"] == "error" and "backward failed" in rows["bwd"]["reason"]
    assert rows["fwd+bwd"]["time"] is None


def test_linear_cross_entropy_case_checked_and_measured():
    assert parse_shape("64,16,1001", ["linear_cross_entropy"]) == ("linear_cross_entropy", (64, 16, 1001))
    cases = build_cases(["linear_cross_entropy"], ["fwd", "bwd", "fwd+bwd"], None, "long", "cpu")
    assert {c.dims for c in cases} == {(8192, 2048, 32000), (8192, 2048, 128256)}  # issue 17's sizes
    assert {c.mode for c in cases} == {"fwd+bwd"}
    case = Case(op="linear_cross_entropy", mode="fwd+bwd", dtype="fp32", dims=(64, 16, 1001))
    rep = bench.run([case], providers=["pyllm-cpu", "torch-linear-ce"], memory=True, log=lambda s: None, **FAST)
    rows = {r["provider"]: r for r in rep["results"]}
    assert rows["pyllm-cpu"]["status"] == rows["torch-linear-ce"]["status"] == "ok"
    assert rows["pyllm-cpu"]["check"]["passed_grad"]
    assert rows["pyllm-cpu"]["peak_bytes"] is not None


class WrongRotary(providers.RotateHalf):
    """Deliberately wrong: rotates by the wrong sign."""

    name = "wrong-rotary"

    def rotary_fn(self, case, q, k, cos, sin):
        return super().rotary_fn(case, q, k, cos, -sin)


def test_rotary_case_checked_then_timed_against_rotate_half():
    cases = [Case(op="rotary", mode=m, dtype="fp32", dims=(2, 9, 4, 2, 16), sweep="model") for m in ("fwd", "fwd+bwd")]
    rep = bench.run(cases, providers=["rotate-half", "pyllm-cpu", "pyllm-reference"], memory=False,
                    extra_providers=[WrongRotary()], log=lambda s: None, **FAST)
    rows = {(r["provider"], r["mode"]): r for r in rep["results"]}
    for mode in ("fwd", "fwd+bwd"):
        assert rows[("wrong-rotary", mode)]["status"] == "WRONG" and rows[("wrong-rotary", mode)]["time"] is None
        for p in ("pyllm-cpu", "pyllm-reference"):
            assert rows[(p, mode)]["status"] == "ok" and rows[(p, mode)]["speedup"] > 0
    assert rep["baselines"]["rotary"] == "rotate-half" and "B2 N9 H4/2 D16" in bench.table(rep)


class WrongGelu(providers.TorchGelu):
    """Deliberately wrong: the exact erf form where the tanh approximation is asked for (off by up to ~5e-4)."""

    name = "wrong-gelu"

    def gelu_fn(self, case, x):
        return lambda: torch.nn.functional.gelu(x)


def test_gelu_case_checked_then_timed_against_torch():
    assert parse_shape("gelu=37,29", ["gelu"]) == ("gelu", (37, 29))
    assert parse_shape("37,29", ["gelu"]) == ("gelu", (37, 29))
    assert bytes_moved(Case(op="gelu", mode="fwd+bwd", dtype="bf16", dims=(4, 8))) == 2 * 4 * 8 * 5
    cases = [Case(op="gelu", mode=m, dtype="fp32", dims=(37, 1029), sweep="width") for m in ("fwd", "fwd+bwd")]
    rep = bench.run(cases, providers=["torch-gelu", "pyllm-cpu", "pyllm-reference"], memory=False,
                    extra_providers=[WrongGelu()], log=lambda s: None, **FAST)
    rows = {(r["provider"], r["mode"]): r for r in rep["results"]}
    for mode in ("fwd", "fwd+bwd"):
        assert rows[("wrong-gelu", mode)]["status"] == "WRONG" and rows[("wrong-gelu", mode)]["time"] is None
        for p in ("pyllm-cpu", "pyllm-reference"):
            assert rows[(p, mode)]["status"] == "ok" and rows[(p, mode)]["speedup"] > 0
    assert rep["baselines"]["gelu"] == "torch-gelu" and "37x1029 tanh" in bench.table(rep)


def test_cpu_rounds_stop_when_the_median_is_stable():
    from pyllm.bench.measure import _stable, time_interleaved

    assert _stable([1.0] * 10, 4, 0.01) and not _stable([1.0] * 3, 4, 0.01)
    assert not _stable([1.0, 2.0, 1.0, 2.0, 1.0, 2.0], 4, 0.01)  # IQR 1 over sqrt(6): not yet known to 1%
    ts = time_interleaved({"a": lambda: None, "b": lambda: None}, "cpu", threads=1, repeats=4, warmup=1,
                          min_run_s=0.0005, max_s=0.3, warmup_s=0.01, max_rounds=40)
    assert all(4 <= len(v) <= 40 for v in ts.values()), {k: len(v) for k, v in ts.items()}
    fixed = time_interleaved({"a": lambda: None}, "cpu", threads=1, repeats=5, warmup=1, min_run_s=0.0005,
                             max_s=0.3)
    assert len(fixed["a"]) == 5  # without max_rounds: exactly `repeats` rounds, as before


def test_cpu_timing_counts_page_faults_per_call(report):
    """A call that writes every page of a fresh 4 MiB mapping faults ~1024 times (4 KiB pages) or at least
    twice (huge pages); one that touches no new memory, about never. Counted per call, per provider."""
    import mmap

    from pyllm.bench.measure import time_interleaved

    def fresh():
        m = mmap.mmap(-1, 1 << 22)
        m[::4096] = b"x" * 1024
        m.close()

    faults = {}
    time_interleaved({"fresh": fresh, "none": lambda: None}, "cpu", threads=1, repeats=3, warmup=1,
                     min_run_s=0.0005, max_s=0.3, faults=faults)
    assert set(faults) == {"fresh", "none"}
    assert faults["fresh"] >= 2 and faults["none"] < 1, faults
    timed = [r for r in report["results"] if r["time"]]
    assert timed and all(r["faults_per_call"] >= 0 for r in timed)
    head = next(line for line in bench.table(report).splitlines() if line.startswith("op "))
    assert "GB/s %lim faults peak mem" in " ".join(head.split())


def test_bench_train_reports_page_faults_and_the_allocator(tmp_path):
    """benchmarks/bench_train.py --quick: the ratio, each model's minor page faults per step and the C allocator's
    settings land in the JSON (a smoke run: the timings themselves are not asserted)."""
    import json
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    out = tmp_path / "train.json"
    assert bench_train.main(["--device", "cpu", "--quick", "--no-memory", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    r = report["throughput"]
    assert r["ratio"] > 0 and set(r["page_faults_per_step"]) == {"pyllm", "transformers"}
    assert all(v >= 0 for v in r["page_faults_per_step"].values())
    assert "libc" in report["allocator"] or "unknown" in report["allocator"]
    # 64 MiB of fresh anonymous pages written once maps 16K pages. Not torch.ones: glibc may carve a 64 MiB block
    # out of heap memory an earlier test freed and kept (already mapped: no fault at all). Huge pages are turned
    # off for the region where the kernel allows it, so each 4 KiB page faults on its own.
    def touch_fresh_pages():
        import mmap

        m = mmap.mmap(-1, 64 << 20)
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
        m.write(b"\1" * (64 << 20))
        m.close()

    assert bench_train.faults_per_step(touch_fresh_pages, n=2) > 1000
