"""Dispatch: the capability tables, the GPU verification record and auto's order, torch.compile with the
default backend choice."""
import json

import pytest
import torch

import pyllm
from pyllm import backends, capabilities
from tests.conftest import KERNEL_BACKENDS, need

CUDA_CALL = {"device": torch.device("cuda"), "dtype": torch.float16, "head_dim": 64}
RECORD = {"backend": "cuda", "ops": ["attention", "layer_norm", "rms_norm"], "gpu": "NVIDIA H200",
          "capability": "9.0", "date": "2026-11-30", "commit": "0123456789abcdef", "torch": "2.11.0",
          "triton": "3.6.0"}


def test_committed_record_loads():
    with open(backends._VERIFIED_FILE, encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data["records"], list)
    assert backends.VERIFIED == backends._load_verified()


def test_auto_takes_triton_before_unverified_cuda():
    assert backends.auto_order("attention", CUDA_CALL, records=[]) == ["triton", "cuda", "cpu", "reference"]
    assert backends.auto_order("attention", CUDA_CALL, records=[RECORD]) == ["cuda", "triton", "cpu", "reference"]
    only_norms = [dict(RECORD, ops=["layer_norm"])]
    assert backends.auto_order("layer_norm", CUDA_CALL, records=only_norms)[0] == "cuda"
    assert backends.auto_order("attention", CUDA_CALL, records=only_norms)[0] == "triton"
    other = [dict(RECORD, backend="triton")]
    assert backends.auto_order("attention", CUDA_CALL, records=other)[0] == "triton"
    cpu_call = dict(CUDA_CALL, device=torch.device("cpu"))
    assert backends.auto_order("attention", cpu_call, records=[]) == ["cuda", "cpu", "reference"]


def test_verification_lines_say_where(tmp_path):
    assert backends.verification("cuda", records=[]).startswith("cuda: not yet verified on a GPU (no benchmarks/gpu_check")
    line = backends.verification("cuda", records=[RECORD])
    assert "verified on a GPU" in line and "NVIDIA H200" in line and "2026-11-30" in line and "attention" in line
    bad = tmp_path / "verified.json"
    bad.write_text("{not json")
    assert backends._load_verified(str(bad)) == []  # unreadable: trust nothing
    bad.write_text(json.dumps({"records": [RECORD, {"ops": "x"}, 3]}))
    assert backends._load_verified(str(bad)) == [RECORD]


def test_explain_reports_auto_and_verification():
    q = torch.randn(1, 5, 2, 16)
    e = backends.explain("attention", q, q, q)
    assert e["reference"] == [] and e.auto in backends.NAMES
    assert set(e.verified) == set(backends.NAMES)
    assert "not yet verified on a GPU" in e.verified["cuda"] or "verified on a GPU" in e.verified["cuda"]
    assert "auto picks" in str(e)


def test_backends_read_the_capability_tables():
    for name in backends.NAMES:
        b = backends._BACKENDS[name]
        caps = capabilities.TABLES[name]
        assert b.max_head_dim == caps.max_head_dim and b.devices == caps.devices
    assert "1-256" in capabilities.table()
    from pyllm.models.config import BACKENDS

    assert BACKENDS == ("auto",) + backends.NAMES
    assert not hasattr(backends, "get")


def test_cuda_declares_its_attention_features_and_declines_the_rest(monkeypatch):
    """The CUDA kernels implement window, softcap, ALiBi and dropout (varlen runs them per sequence), not attn_bias;
    an extension built before the feature op existed declines every feature with a reason."""
    b = backends._BACKENDS["cuda"]
    assert b.attention_features == {"dropout", "window", "softcap", "alibi", "varlen"}
    monkeypatch.setattr(b, "unavailable_reason", lambda: None)  # as on a GPU machine with pyllm._C built
    monkeypatch.setattr(backends, "_ext_has_kernel", lambda op, key: True)
    base = backends.Backend.not_supported_reasons  # without the device capability query (no GPU here)
    assert base(b, "attention", dict(CUDA_CALL, features=("dropout", "window", "softcap", "alibi", "varlen"))) == []
    assert base(b, "attention", dict(CUDA_CALL, features=("window", "attn_bias"))) == [
        "attn_bias not implemented in the cuda kernels"]
    monkeypatch.setattr(backends, "_ext_has_kernel", lambda op, key: op != "attention_ext")
    reasons = base(b, "attention", dict(CUDA_CALL, features=("softcap",)))
    assert len(reasons) == 1 and "attention_ext_fwd" in reasons[0] and "rebuild" in reasons[0]
    assert base(b, "attention", CUDA_CALL) == []  # plain attention needs only attention_fwd


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_default_backend(backend, device):
    """Issue 13/14: fullgraph=True without backend= (the default choice is traced and guarded)."""
    need(backend)
    torch._dynamo.reset()

    def f(q, x, w):
        o = pyllm.attention(q, q, q, causal=True)
        return o.float().square().sum() + pyllm.layer_norm(x, (16,), w).float().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 9, 2, 16, device=device, requires_grad=True)
    x, w = torch.randn(3, 16, device=device), torch.randn(16, device=device)
    with backends.use(backend):
        got = compiled(q, x, w)
        got.backward()
        torch.testing.assert_close(got, f(q, x, w))
    g = q.grad.clone()
    q.grad = None
    with backends.use("reference"):  # a new choice recompiles (guarded), and still traces whole
        ref = compiled(q, x, w)
        ref.backward()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g, q.grad, atol=1e-4, rtol=1e-4)
    compiled(q, x, w)  # plain auto


def test_dispatch_code_never_imports_the_package_inside_a_function():
    """Torch 2.11's dynamo refuses ``from pyllm import _ext`` inside a traced function ("Bad import result": the
    package is a ModuleType subclass), which broke torch.compile(fullgraph=True) of every op there (seen on an
    H200, 2026-11-30; torch 2.13's accepts it, so no CPU test here can see it). The dispatch modules read the
    extension through backends' assume_constant_result helpers instead; imports of ``pyllm`` stay in functions
    that run eagerly once (the extension's loaders and registrations)."""
    import ast
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    once = {"load", "_register_extension_ops"}  # pyllm/ops/_fast.py, pyllm/ops/_autograd.py: load time only
    files = ["pyllm/backends.py"] + [os.path.join("pyllm/ops", f) for f in os.listdir(os.path.join(root, "pyllm/ops"))
                                     if f.endswith(".py")]
    bad = []
    for rel in files:
        tree = ast.parse(open(os.path.join(root, rel)).read())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in once:
                continue
            if any("assume_constant_result" in ast.unparse(d) for d in fn.decorator_list):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.ImportFrom) and node.module == "pyllm" and node.level == 0) or (
                        isinstance(node, ast.Import) and any(a.name.split(".")[0] == "pyllm" for a in node.names)):
                    bad.append(f"{rel}:{node.lineno} in {fn.name}()")
    assert not bad, bad
