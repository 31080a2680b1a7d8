"""Issue 15 item 2: the norm op layer's small-call shortcuts change nothing but the cost.

The backend choice is cached per call description (and still follows ``backends.use`` and per-call
``backend=``); calls with nothing to differentiate skip the autograd wrapper and give the same values.
"""
import pytest
import torch

import pyllm
from pyllm import backends
from tests.conftest import need


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_no_grad_shortcut_matches_autograd_path(op, shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(*shape), torch.randn(24), torch.randn(24)
    call = (lambda x, w, b: pyllm.layer_norm(x, (24,), w, b)) if op == "layer_norm" else (
        lambda x, w, b: pyllm.rms_norm(x, (24,), w, 1e-6))
    with torch.no_grad():
        fast = call(x, w, b)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    slow = call(xs, ws, bs)
    assert not fast.requires_grad and slow.requires_grad and fast.shape == x.shape
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    slow.sum().backward()
    assert xs.grad is not None and ws.grad is not None
    plain = call(x, w, b)  # grad mode on, no input requires grad: the shortcut too
    assert not plain.requires_grad
    torch.testing.assert_close(plain, fast, rtol=0, atol=0)


def test_residual_shortcut_returns_both_outputs():
    x, r, w, b = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16), torch.randn(16)
    with torch.no_grad():
        y, h = pyllm.layer_norm(x, (16,), w, b, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (16,), w, b), rtol=1e-5, atol=1e-5)


def test_cached_selection_follows_use_and_per_call_backend():
    x, w = torch.randn(3, 8), torch.randn(8)
    call = {"device": x.device, "dtype": x.dtype, "hidden": 8, "weight_dtype": w.dtype}
    auto = backends.select("layer_norm", call)
    assert backends.select("layer_norm", call) == auto  # a cache hit answers the same
    with backends.use("reference"):
        assert backends.select("layer_norm", call) == "reference"
    assert backends.select("layer_norm", call, "reference") == "reference"
    assert backends.select("layer_norm", call) == auto
    with pytest.raises(ValueError, match="cannot serve"):  # refusals are never cached as answers
        backends.select("layer_norm", dict(call, dtype=torch.int32), "cpu" if "cpu" in backends.available()
                        else "triton")


def test_cache_keeps_no_tensor_alive():
    t = torch.randn(2)
    call = {"device": t.device, "dtype": t.dtype, "hidden": 2, "weight_dtype": None, "extra": t}
    before = dict(backends._selected)
    backends.select("layer_norm", call)
    assert backends._selected == before


def test_validated_metadata_skips_to_the_kernel(monkeypatch):
    """A norm call whose metadata passed validation before goes straight to the kernel: same values, gradients
    still flow, the backend in force still decides, and bad arguments (new metadata) are still refused.
    (This cache serves the calls the C++ fast path does not take, e.g. CUDA tensors: switched off here.)"""
    import importlib

    L = importlib.import_module("pyllm.ops.layer_norm")
    monkeypatch.setattr(L, "_FAST", None)
    x, w, b = torch.randn(4, 24), torch.randn(24), torch.randn(24)
    first = pyllm.layer_norm(x, 24, w, b)
    key = L._fast_key("layer_norm", x, 24, w, b, 1e-5, None, None)
    assert key in L._validated and not any(isinstance(e, torch.Tensor) for e in key)
    torch.testing.assert_close(pyllm.layer_norm(x, 24, w, b), first, rtol=0, atol=0)
    xs = x.clone().requires_grad_(True)
    pyllm.layer_norm(xs, 24, w, b).sum().backward()
    assert xs.grad is not None and xs.grad.shape == x.shape
    with backends.use("reference"):
        assert L._fast_key("layer_norm", x, 24, w, b, 1e-5, None, None) != key
        torch.testing.assert_close(pyllm.layer_norm(x, 24, w, b),
                                   torch.nn.functional.layer_norm(x, (24,), w, b), rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight"):
        pyllm.layer_norm(x, 24, torch.randn(23), b)
    with pytest.raises(ValueError, match="eps"):
        pyllm.layer_norm(x, 24, w, b, eps=-1.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        pyllm.layer_norm(torch.randn(4, 25), 24, w, b)


def test_attention_validated_metadata_skips_the_checks(monkeypatch):
    """attention without features: a call whose metadata was validated before skips the checks and the backend
    choice; values unchanged, gradients flow, use() still decides, and new (bad) metadata is still refused.
    (This cache serves the calls the C++ fast path does not take, e.g. CUDA tensors: switched off here.)"""
    import importlib

    A = importlib.import_module("pyllm.ops.attention")
    monkeypatch.setattr(A, "_FAST", None)
    q, k, v = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    first = pyllm.attention(q, k, v, causal=True)
    key = A._fast_key(q, k, v, None, None, None)
    assert key in A._validated and not any(isinstance(e, torch.Tensor) for e in key)
    torch.testing.assert_close(pyllm.attention(q, k, v, causal=True), first, rtol=0, atol=0)
    qs = q.clone().requires_grad_(True)
    pyllm.attention(qs, k, v, causal=True).sum().backward()
    assert qs.grad is not None and qs.grad.shape == q.shape
    with backends.use("reference"):
        assert A._fast_key(q, k, v, None, None, None) != key
        torch.testing.assert_close(pyllm.attention(q, k, v, causal=True),
                                   pyllm.reference.attention(q, k, v, causal=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="head_dim"):
        pyllm.attention(q, k[..., :4], v)
    with pytest.raises(TypeError, match="key_padding_mask"):
        pyllm.attention(q, k, v, key_padding_mask=torch.ones(1, 5))


# ---- the C++ fast path (csrc/small_calls.cpp) and the C++ autograd of the kernel ops (csrc/autograd.cpp)
def _modules():
    import importlib

    return importlib.import_module("pyllm.ops.layer_norm"), importlib.import_module("pyllm.ops.attention")


def _need_fast():
    need("cpu")
    L, A = _modules()
    if L._FAST is None or A._FAST is None:
        pytest.fail("pyllm._C has no fast path: rebuild the extension (python setup.py build_ext --inplace)")
    return L, A


def _norm_grads(fn, x, w, b, r):
    leaves = [t for t in (x, w, b, r) if t is not None]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in (x, w, b, r)]
    out = fn(*args)
    y, h = out if isinstance(out, tuple) else (out, None)
    loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum() + (0 if h is None else (h ** 2).sum())
    return out, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", ["2d", "3d", "two_dim_shape", "residual", "strided", "no_weight", "fp32_w_bf16_x",
                                  "fp64", "size_shape"])
def test_norm_fast_path_equals_the_full_path(op, case, monkeypatch):
    """The fast path takes the common calls (it returns a tensor, not None) and gives the full path's values and
    gradients bit for bit (the same C++ op behind both)."""
    L, _ = _need_fast()
    torch.manual_seed(0)
    dt = {"fp32_w_bf16_x": torch.bfloat16, "fp64": torch.float64}.get(case, torch.float32)
    shape, ns = {"3d": ((2, 3, 20), (20,)), "two_dim_shape": ((3, 4, 5), (4, 5)),
                 "size_shape": ((3, 20), torch.Size([20]))}.get(case, ((5, 20), (20,)))
    x = torch.randn(*shape, dtype=dt)
    if case == "strided":
        x = torch.randn(20, 5).t()  # stride(-1) != 1: the fast path copies it, as the full path does
    pdt = torch.float32 if case == "fp32_w_bf16_x" else dt
    w = None if case == "no_weight" else torch.randn(ns, dtype=pdt)
    b = None if case == "no_weight" or op == "rms_norm" else torch.randn(ns, dtype=pdt)
    r = torch.randn(*shape, dtype=dt) if case == "residual" else None
    eps = 1e-5 if op == "layer_norm" else None
    assert L._FAST(x, ns, w, b, r, eps, op == "rms_norm") is not None

    def call(x, w, b, r):
        if op == "layer_norm":
            return pyllm.layer_norm(x, ns, w, b, residual=r)
        return pyllm.rms_norm(x, ns, w, residual=r)

    fast, fast_grads = _norm_grads(call, x, w, b, r)
    monkeypatch.setattr(L, "_FAST", None)
    full, full_grads = _norm_grads(call, x, w, b, r)
    for a, e in zip(fast if isinstance(fast, tuple) else (fast,), full if isinstance(full, tuple) else (full,)):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for a, e in zip(fast_grads, full_grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_norm_fast_path_declines_what_it_does_not_cover(monkeypatch):
    """None (the full path) for anything but the common call; the public op then answers as before: errors that
    name the argument, dtype harmonization, the reference."""
    L, _ = _need_fast()
    fast = L._FAST
    x, w, b = torch.randn(4, 16), torch.randn(16), torch.randn(16)
    assert fast(x, 16, w, b, None, 1e-5, False) is not None
    declined = [
        (x.int(), 16, w, b, None, 1e-5),  # not a float dtype
        (x, 15, w, b, None, 1e-5),  # normalized_shape does not match
        (x, 16, torch.randn(15), b, None, 1e-5),  # weight shape
        (x, 16, w.half(), b, None, 1e-5),  # a 16-bit weight beside an fp32 input: harmonized by the full path
        (x, 16, w.double(), b, None, 1e-5),  # float64 weight, float32 input: an error of the full path
        (x, 16, w, b, torch.randn(4, 16, dtype=torch.float64), 1e-5),  # residual dtype: promoted by the full path
        (x, 16, w, b, None, -1.0), (x, 16, w, b, None, float("nan")), (x, 16, w, b, None, True),  # eps
        (torch.randn(0, 16), 16, w, b, None, 1e-5),  # empty: the reference
        (x, 16, [1.0] * 16, b, None, 1e-5),  # not a tensor
        (x.as_subclass(_Sub), 16, w, b, None, 1e-5),  # a tensor subclass: its own semantics, the full path
    ]
    for args in declined:
        assert fast(*args, False) is None, args
    with pytest.raises(ValueError, match="weight must have shape"):
        pyllm.layer_norm(x, 16, torch.randn(15), b)
    with pytest.raises(ValueError, match="eps"):
        pyllm.layer_norm(x, 16, w, b, eps=-1.0)
    with pytest.raises(TypeError, match="float64"):
        pyllm.layer_norm(x, 16, w.double(), b)
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):  # a torch-function mode sees the torch.ops call of the full path
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert fast(x, 16, w, b, None, 1e-5, False) is None
    monkeypatch.setenv("PYLLM_BACKEND", "reference")  # the backend in force decides, env included
    assert fast(x, 16, w, b, None, 1e-5, False) is None
    torch.testing.assert_close(pyllm.layer_norm(x, 16, w, b), torch.nn.functional.layer_norm(x, (16,), w, b),
                               rtol=0, atol=0)
    monkeypatch.setenv("PYLLM_BACKEND", "cpu")
    assert fast(x, 16, w, b, None, 1e-5, False) is not None


class _Sub(torch.Tensor):
    pass


def test_fast_paths_agree_with_the_backend_choice():
    """The fast paths take a dtype exactly when auto picks the cpu backend for it (pyllm.capabilities)."""
    import importlib

    L, A = _need_fast()
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32):
        x = torch.ones(2, 8, dtype=dt)
        call = {"device": x.device, "dtype": dt, "hidden": 8, "weight_dtype": None}
        cpu = backends.select("layer_norm", call) == "cpu"
        assert (L._FAST(x, 8, None, None, None, 1e-5, False) is not None) == cpu, dt
        q = torch.ones(1, 3, 2, 8, dtype=dt)
        cpu = backends.select("attention", {"device": q.device, "dtype": dt, "head_dim": 8, "unsupported": [],
                                            "features": ()}) == "cpu"
        assert (A._FAST(q, q, q, False, None, None) is not None) == cpu, dt
        R = importlib.import_module("pyllm.ops.rotary")
        table = torch.ones(1, 3, 4, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        cpu = backends.select("rotary", {"device": q.device, "dtype": dt, "unsupported": []}) == "cpu"
        assert (R._FAST(q, q, table, table, False) is not None) == cpu, dt
    big = torch.ones(1, 2, 1, 512)  # head_dim 512 > the cpu backend's limit: auto takes the reference
    assert backends.select("attention", {"device": big.device, "dtype": big.dtype, "head_dim": 512,
                                         "unsupported": [], "features": ()}) == "reference"
    assert A._FAST(big, big, big, False, None, None) is None


@pytest.mark.parametrize("case", ["plain", "causal_gqa", "mask", "strided", "scale_int", "fp64"])
def test_attention_fast_path_equals_the_full_path(case, monkeypatch):
    _, A = _need_fast()
    torch.manual_seed(0)
    dt = torch.float64 if case == "fp64" else torch.float32
    q, k, v = torch.randn(2, 7, 4, 8, dtype=dt), torch.randn(2, 9, 4, 8, dtype=dt), torch.randn(2, 9, 4, 8, dtype=dt)
    kw = {}
    if case == "causal_gqa":
        k, v, kw = k[:, :, :2], v[:, :, :2], {"causal": True}
    if case == "mask":
        kw = {"key_padding_mask": torch.arange(9).expand(2, 9) < torch.tensor([[9], [4]])}
    if case == "strided":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        q = q[..., ::2]
        k, v = k[..., ::2], v[..., ::2]  # stride(-1) == 2: the fast path copies, as the full path does
    if case == "scale_int":
        kw = {"softmax_scale": 1}
    assert A._FAST(q, k, v, kw.get("causal", False), kw.get("softmax_scale"), kw.get("key_padding_mask")) is not None

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        o = pyllm.attention(*leaves, **kw)
        return o, torch.autograd.grad((o * o).sum(), leaves)

    fast, fast_grads = run()
    monkeypatch.setattr(A, "_FAST", None)
    full, full_grads = run()
    torch.testing.assert_close(fast, full, rtol=0, atol=0)
    for a, e in zip(fast_grads, full_grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_attention_fast_path_declines_what_it_does_not_cover():
    _, A = _need_fast()
    q = torch.randn(1, 3, 2, 8)
    fast = A._FAST
    assert fast(q, q, q, False, None, None) is not None
    for args in [(q, q[..., :4], q, False, None, None), (q, q, q, 1, None, None), (q, q, q, False, float("inf"), None),
                 (q, q, q, False, None, torch.ones(1, 3)), (q, q, q.double(), False, None, None),
                 (q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8), False, None, None), (q[:, :0], q, q, False, None, None)]:
        assert fast(*args) is None
    with pytest.raises(TypeError, match="key_padding_mask"):
        pyllm.attention(q, q, q, key_padding_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="head_dim"):
        pyllm.attention(q, q[..., :4], q)
    with backends.use("reference"):  # the backend in force decides: the reference's own result
        torch.testing.assert_close(pyllm.attention(q, q, q), pyllm.reference.attention(q, q, q), rtol=0, atol=0)
    o, lse = pyllm.attention(q, q, q, return_lse=True)  # return_lse: the full path
    torch.testing.assert_close(o, fast(q, q, q, False, None, None), rtol=0, atol=0)


def _rotary_case(dt=torch.float32, B=2, N=5, Hq=4, Hk=2, D=8, r=None):
    torch.manual_seed(0)
    q, k = torch.randn(B, N, Hq, D, dtype=dt), torch.randn(B, N, Hk, D, dtype=dt)
    r = D // 2 if r is None else r
    angles = torch.arange(N, dtype=torch.float64)[None, :, None] * torch.rand(1, 1, r, dtype=torch.float64)
    table = torch.float64 if dt == torch.float64 else torch.float32
    return q, k, angles.cos().to(table), angles.sin().to(table)


@pytest.mark.parametrize("case", ["plain", "partial", "per_batch", "interleaved", "strided", "bf16", "fp64"])
def test_rotary_fast_path_equals_the_full_path(case, monkeypatch):
    """pyllm.rotary's common call on CPU tensors is taken in C++ (pyllm._C.rotary_fast) and gives the full path's
    values and gradients bit for bit (the same C++ op behind both)."""
    need("cpu")
    import importlib

    R = importlib.import_module("pyllm.ops.rotary")
    if R._FAST is None:
        pytest.fail("pyllm._C has no rotary fast path: rebuild the extension (python setup.py build_ext --inplace)")
    dt = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(case, torch.float32)
    q, k, cos, sin = _rotary_case(dt, r=3 if case == "partial" else None)
    if case == "per_batch":
        cos, sin = cos.expand(2, -1, -1).contiguous(), sin.expand(2, -1, -1).contiguous()
    if case == "strided":  # slices of a packed projection: only the last dim contiguous
        packed = torch.randn(2, 5, 4 * 8 + 2 * 8 + 3)
        q, k = packed[..., :32].view(2, 5, 4, 8), packed[..., 32:48].view(2, 5, 2, 8)
    inter = case == "interleaved"
    assert R._FAST(q, k, cos, sin, inter) is not None

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
        qo, ko = pyllm.rotary(*leaves, cos, sin, interleaved=inter)
        return (qo, ko), torch.autograd.grad((qo.float() ** 2).sum() + ko.float().sum(), leaves)

    fast, fast_grads = run()
    monkeypatch.setattr(R, "_FAST", None)
    full, full_grads = run()
    for a, e in zip(fast + fast_grads, full + full_grads):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_rotary_fast_path_declines_what_it_does_not_cover(monkeypatch):
    need("cpu")
    import importlib

    R = importlib.import_module("pyllm.ops.rotary")
    if R._FAST is None:
        pytest.fail("pyllm._C has no rotary fast path: rebuild the extension (python setup.py build_ext --inplace)")
    q, k, cos, sin = _rotary_case()
    fast = R._FAST
    assert fast(q, k, cos, sin, False) is not None
    declined = [
        (q, k, cos[0], sin[0], False),  # 2-D tables: reshaped by the full path
        (q, k, cos.double(), sin.double(), False),  # float64 tables beside fp32 inputs: converted by the full path
        (q, k, cos, sin[:, :, :3], False),  # tables of different shapes: an error of the full path
        (q, k, cos[:, :4], sin[:, :4], False),  # seqlen mismatch
        (q, k[:, :, :, :4], cos, sin, False),  # head_dim mismatch
        (q, k.double(), cos, sin, False),  # dtype mismatch
        (q, k, cos.requires_grad_(True), sin, False),  # tables that require grad: the reference
        (q, k, cos.detach(), sin, 1),  # interleaved not a bool
        (q[:, :, :, :0], k[:, :, :, :0], cos[..., :0], sin[..., :0], False),  # empty
        (q.as_subclass(_Sub), k, cos.detach(), sin, False),  # a subclass: the full path
        (q.int(), k.int(), cos.detach(), sin, False),  # not a float dtype
    ]
    for args in declined:
        assert fast(*args) is None, args
    with pytest.raises(ValueError, match=r"cos has shape \(1, 4, 4\); expected \(1 or 2, 5, r\)"):
        pyllm.rotary(q, k, cos.detach()[:, :4], sin[:, :4])
    monkeypatch.setenv("PYLLM_BACKEND", "reference")  # the backend in force decides, env included
    assert fast(q, k, cos.detach(), sin, False) is None
    with backends.use("reference"):
        for a, e in zip(pyllm.rotary(q, k, cos.detach(), sin), pyllm.reference.rotary(q, k, cos.detach(), sin)):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_cpp_autograd_serves_the_kernel_ops_and_costs_nothing_without_grad():
    """layer_norm_fwd and attention_fwd have their autograd in C++ (no Python autograd wrapper registered for
    them); without grad mode nothing is recorded, and an unused output's gradient is simply absent."""
    _need_fast()
    for op in ("layer_norm_fwd", "attention_fwd"):
        assert "autograd.cpp" in torch._C._dispatch_dump(f"pyllm::{op}").split("Autograd[alias]: ")[1].splitlines()[0]
    x = torch.randn(3, 8, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    with torch.no_grad():
        assert pyllm.layer_norm(x, 8, w, b).grad_fn is None
    r = torch.randn(3, 8, requires_grad=True)
    y, h = pyllm.layer_norm(x, 8, w, b, residual=r)
    gx, gr, gw, gb = torch.autograd.grad(h.sum(), (x, r, w, b), allow_unused=True)  # y unused
    torch.testing.assert_close(gx, torch.ones_like(x))
    torch.testing.assert_close(gr, torch.ones_like(r))
    assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
    xs = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.layer_norm(xs, (8,), w, b)
    y, h = pyllm.layer_norm(x, 8, w, b, residual=torch.zeros(3, 8))  # h unused
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(ref.sum(), xs)[0])
