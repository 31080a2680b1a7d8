"""benchmarks/gpu_check.sh's logic, proven without a GPU: its --dry-run walks every step with the GPU parts
stubbed (fake nvidia-smi, nvcc, cmake, ncu, compute-sanitizer and GPU python) and must leave a complete
report in at most 8 files directly under the output folder; gpu_record.py appends verified records."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_walks_every_step_and_leaves_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    before = open(os.path.join(ROOT, "pyllm", "verified.json")).read() if os.path.exists(
        os.path.join(ROOT, "pyllm", "verified.json")) else None
    r = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    entries = sorted(os.listdir(out))
    assert len(entries) <= 8 and all((out / e).is_file() for e in entries), entries
    assert {"report.md", "report.json", "logs.tar.gz", "ptxas.md", "verified.json"} <= set(entries)
    report = json.loads((out / "report.json").read_text())
    names = {s["name"]: s["status"] for s in report["steps"]}
    for step in ("env", "build_ext", "build_dev", "harness_attention_fwd", "harness_attention_bwd",
                 "harness_layer_norm", "ncu_attn_fwd", "ncu_attn_dkdv", "memcheck_layer_norm",
                 "racecheck_attention_bwd", "synccheck_attention_fwd", "pytest_cuda_test_attention",
                 "pytest_triton_test_layer_norm", "bench_attention", "bench_attention_triton", "bench_norms",
                 "bench_ops", "record"):
        assert names.get(step) == "ok", (step, names)
    for backend in ("cuda", "triton"):  # every op test file, on both GPU backends
        for f in ("attention", "attention_features", "dropins", "layer_norm", "rotary", "linear_cross_entropy", "gelu"):
            assert names.get(f"pytest_{backend}_test_{f}") == "ok", (backend, f, names)
    assert "dry run" in report["verdict"]
    assert "`attn_fwd_kernel<half, 128, 64, 4>` | sm_90 | 168 | 0 | 0" in (out / "ptxas.md").read_text()
    records = json.loads((out / "verified.json").read_text())["records"]
    assert {r["backend"] for r in records if r["gpu"] == "DRY-RUN GPU"} == {"cuda", "triton"}
    after = open(os.path.join(ROOT, "pyllm", "verified.json")).read() if os.path.exists(
        os.path.join(ROOT, "pyllm", "verified.json")) else None
    assert after == before  # a dry run never touches the package's record


def test_extension_sources_make_distinct_objects():
    # torch's ninja build names each object after its source's path without the suffix: linear_cross_entropy.cu
    # and linear_cross_entropy.cpp in one folder made "multiple rules generate ... linear_cross_entropy.o" and
    # failed the first GPU build (2026-11-30), which no CPU build can see
    import glob
    stems = {}
    for src in glob.glob(os.path.join(ROOT, "csrc", "**", "*.c*"), recursive=True):
        if src.endswith((".cpp", ".cu", ".cc")):
            stems.setdefault(os.path.splitext(src)[0], []).append(os.path.basename(src))
    assert not {k: v for k, v in stems.items() if len(v) > 1}


def test_dry_run_out_of_budget_skips_and_says_so(tmp_path):
    # 16 s = 12 s kept for the report + 4 s, less than the 5 s a step needs: the env step always runs (it is not
    # budgeted), every other step is skipped for time, however fast the machine (with 17 s the tests, which start
    # beside the sanitizers, ran when they started within the first second)
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, "--dry-run", str(out), "16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and len(os.listdir(out)) <= 8, r.stdout[-3000:]
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["env"]["status"] == "ok"
    tests = [s for n, s in steps.items() if n.startswith("pytest_")]
    assert tests and all(s["status"] == "skipped" and "out of time" in s["command"] for s in tests), tests
    assert "steps skipped" in report["verdict"]
    assert "verified.json" not in os.listdir(out)  # nothing recorded when the tests did not run


def test_gpu_record_appends_once(tmp_path):
    path = tmp_path / "verified.json"
    args = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_record.py"), "--file", str(path), "--backend",
            "cuda", "--ops", "layer_norm", "attention", "--gpu", "NVIDIA H200", "--capability", "9.0",
            "--commit", "abc", "--date", "2026-11-30", "--torch", "2.11.0", "--triton", "3.6.0"]
    for _ in range(2):
        subprocess.run(args, check=True, capture_output=True)
    data = json.loads(path.read_text())
    assert data == {"records": [{"backend": "cuda", "ops": ["attention", "layer_norm"], "gpu": "NVIDIA H200",
                                 "capability": "9.0", "date": "2026-11-30", "commit": "abc", "torch": "2.11.0",
                                 "triton": "3.6.0"}]}


def test_mma_fragment_layouts_simulated():
    """csrc/dev/mma_fragments_sim.py: the attention kernels' ldmatrix/mma.sync address formulas, on the CPU."""
    pytest.importorskip("numpy")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "dev", "mma_fragments_sim.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dV = P^T dO" in r.stdout
