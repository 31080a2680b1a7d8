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
from pyllm.bench import cli, providers
from pyllm.bench.spec import BenchError, Case, build_cases, parse_shape

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
        else:
            assert r["gbps"] > 0 and r["frac_of_copy"] > 0
        if r["provider"] == r["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)
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
    assert f == pytest.approx(4 * 2 * 4 * 128 * 128 * 64 / 2 * 3.5)


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
