"""LayerNorm / RMSNorm ops on every backend: FlashAttention's accuracy rule, odd sizes, strides, autograd,
torch.library (opcheck, torch.compile), and bad input."""
import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm.check import norm_case
from tests.conftest import DEVICE, KERNEL_BACKENDS, need

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["layer_norm", "rms_norm"]


def assert_rows(rows):
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n".join(f"{r.op} {r.backend} {r.dtype} {r.shape} {r.tensor}: {r.error:.3e} > {r.allowed:.3e}"
                              for r in bad)


# ---- accuracy: hidden sizes 1..65536, odd; every dtype; with and without residual / affine
CPU_GRID = [(7, 1), (5, 3), (33, 127), (9, 1000), (3, 4097), (2, 65536)]
TRITON_GRID = [(7, 1), (5, 3), (9, 127), (3, 1000), (2, 4097)]


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_rule(backend, op, dtype):
    need(backend)
    grid = TRITON_GRID if (backend == "triton" and DEVICE == "cpu") else CPU_GRID
    for i, (M, N) in enumerate(grid):
        assert_rows(norm_case(op, backend, dtype, M, N, residual=bool(i % 2), device=DEVICE, seed=i))
        assert_rows(norm_case(op, backend, dtype, M, N, residual=not i % 2, affine=False, device=DEVICE, seed=i))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_65536_triton_and_fp32_weights_with_bf16_input(backend):
    need(backend)
    if backend == "triton" and DEVICE == "cpu":
        assert_rows(norm_case("layer_norm", backend, torch.float32, 1, 65536, device=DEVICE))
    x = torch.randn(6, 256, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(256, device=DEVICE)  # fp32 weight with bf16 input: autocast-style mixed precision
    b = torch.randn(256, device=DEVICE)
    y = pyllm.layer_norm(x, (256,), w, b, backend=backend)
    ref = pyllm.reference.layer_norm(x.float(), (256,), w, b).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_strided_and_leading_dims(backend, op):
    need(backend)
    big = torch.randn(4, 3, 80, device=DEVICE, requires_grad=True)
    x = big[:, :, 3:67]  # rows not contiguous with each other; last dim contiguous
    xt = torch.randn(3, 4, 64, device=DEVICE).transpose(0, 1)  # leading dims transposed
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    fn = getattr(pyllm, op)
    for inp in (x, xt):
        y = fn(inp, (64,), w, backend=backend)
        ref = fn(inp, (64,), w, backend="reference")
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        assert y.shape == inp.shape
    y = fn(x, (64,), w, backend=backend)
    y.sum().backward()
    g_fast = big.grad.clone()
    big.grad = None
    fn(x, (64,), w, backend="reference").sum().backward()
    torch.testing.assert_close(g_fast, big.grad, atol=1e-5, rtol=1e-5)


def test_multi_dim_normalized_shape():
    x = torch.randn(2, 5, 6, 7, device=DEVICE)
    w = torch.randn(6, 7, device=DEVICE)
    b = torch.randn(6, 7, device=DEVICE)
    torch.testing.assert_close(pyllm.layer_norm(x, (6, 7), w, b), F.layer_norm(x, (6, 7), w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 gradcheck is for the cpu backend")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_cpu_fp64(op, residual):
    need("cpu")
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 11, dtype=torch.float64, requires_grad=True) if residual else None
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, r):
        if op == "layer_norm":
            out = pyllm.layer_norm(x, (11,), w, b, residual=r, backend="cpu")
        else:
            out = pyllm.rms_norm(x, (11,), w, 1e-5, residual=r, backend="cpu")
        return out if r is None else out[0] * 1.5 + out[1] ** 2  # both outputs get gradients

    assert torch.autograd.gradcheck(lambda x, w, b, r=None: f(x, w, b if op == "layer_norm" else None, r),
                                    (x, w, b) + ((r,) if residual else ()))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("used", ["normed", "sum"])
def test_residual_with_one_output_unused(backend, used):
    """norm(x, residual=r) -> (normed, x + r) with only one output used (post-norm blocks drop the sum; the
    unused output's gradient reaches backward as None, not as zeros): the gradients are the reference's."""
    need(backend)
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(2, 7, 24, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    w, b = (torch.randn(24, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    out = pyllm.layer_norm(x, (24,), w, b, residual=r, backend=backend)
    ref = F.layer_norm(x + r, (24,), w, b)
    pick = (lambda o: o[0]) if used == "normed" else (lambda o: o[1])
    want = ref if used == "normed" else x + r
    dout = torch.randn(want.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad(pick(out), (x, r, w, b), dout, allow_unused=True)
    exp = torch.autograd.grad(want, (x, r, w, b), dout, allow_unused=True)
    for a, e in zip(got, exp):
        if e is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def _opcheck_args(device, dtype=torch.float32):
    x = torch.randn(5, 33, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(33, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(33, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(5, 33, device=device, dtype=dtype, requires_grad=True)
    return [(x, w, b, r, 1e-5, False), (x, w, None, None, 1e-6, True), (x, None, None, r, 1e-5, False)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    need(backend)
    op = torch.ops.pyllm.triton_layer_norm_fwd if backend == "triton" else torch.ops.pyllm.layer_norm_fwd
    for args in _opcheck_args(DEVICE):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile(backend):
    need(backend)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, b, r):
        y, h = pyllm.layer_norm(x, (48,), w, b, residual=r, backend=backend)
        return (y * 2).sum() + h.sum()

    x = torch.randn(6, 48, device=DEVICE, requires_grad=True)
    w = torch.randn(48, device=DEVICE, requires_grad=True)
    b = torch.randn(48, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 48, device=DEVICE)
    f(x, w, b, r).backward()
    gx = x.grad.clone()
    x.grad = None
    y, h = pyllm.layer_norm(x, (48,), w, b, residual=r, backend="reference")
    ((y * 2).sum() + h.sum()).backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_mixed_precision_promotes_like_torch(backend):
    need(backend)
    x = torch.randn(4, 64, device=DEVICE).to(torch.bfloat16)  # a bf16 branch output (autocast)
    r = torch.randn(4, 64, device=DEVICE)  # the fp32 residual stream
    w = torch.randn(64, device=DEVICE).to(torch.bfloat16)  # bf16 weight with an fp32 sum: upcast
    y, h = pyllm.layer_norm(x, (64,), w, residual=r, backend=backend)
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (64,), w.float()), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=DEVICE == "cpu"):
        y2, _ = pyllm.rms_norm(x, (64,), None, residual=r, backend=backend)
    assert y2.dtype == torch.float32


# ---- modules
def test_modules_are_drop_ins():
    ln_t, ln_p = torch.nn.LayerNorm(40), pyllm.nn.LayerNorm(40)
    rms_t, rms_p = torch.nn.RMSNorm(40), pyllm.nn.RMSNorm(40)
    for t, p in ((ln_t, ln_p), (rms_t, rms_p)):
        with torch.no_grad():
            for prm in t.parameters():
                prm.uniform_(0.5, 1.5)
        assert list(t.state_dict()) == list(p.state_dict())
        p.load_state_dict(t.state_dict())
        x = torch.randn(3, 7, 40)
        torch.testing.assert_close(p(x), t(x), atol=1e-5, rtol=1e-5)
    y, h = ln_p(torch.ones(2, 40), residual=torch.ones(2, 40))
    assert torch.equal(h, torch.full((2, 40), 2.0))


def test_replace_modules_keeps_weights():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16),
                                torch.nn.Sequential(torch.nn.RMSNorm(16, eps=1e-3)))
    with torch.no_grad():
        model[1].weight.uniform_()
        model[2][0].weight.uniform_()
    x = torch.randn(4, 16)
    before = model(x)
    out = pyllm.nn.replace_modules(model)
    assert out is model
    assert isinstance(model[1], pyllm.nn.LayerNorm) and isinstance(model[2][0], pyllm.nn.RMSNorm)
    assert model[2][0].eps == 1e-3
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


# ---- bad input: errors name the argument, the expected and the received
@pytest.mark.parametrize("call,exc,words", [
    (lambda x: pyllm.layer_norm(x.int(), (8,)), TypeError, ["input", "float32", "int32"]),
    (lambda x: pyllm.layer_norm(x, (7,)), ValueError, ["normalized_shape", "[7]", "[4, 8]"]),
    (lambda x: pyllm.layer_norm(x, (8,), torch.ones(7)), ValueError, ["weight", "[8]", "[7]"]),
    (lambda x: pyllm.layer_norm(x, (8,), torch.ones(8), torch.ones(9)), ValueError, ["bias", "[8]", "[9]"]),
    (lambda x: pyllm.layer_norm(x.half(), (8,), torch.ones(8, dtype=torch.float64)), TypeError,
     ["weight", "float64", "float16"]),
    (lambda x: pyllm.layer_norm(x, (8,), residual=torch.ones(4, 9)), ValueError, ["residual", "[4, 8]", "[4, 9]"]),
    (lambda x: pyllm.layer_norm(x, (8,), backend="fast"), ValueError, ["backend", "'fast'", "reference"]),
    (lambda x: pyllm.rms_norm(x, (8,), eps=-1.0), ValueError, ["eps", "-1.0"]),
    (lambda x: pyllm.layer_norm(x, (8,), torch.ones(8, device="meta")), ValueError, ["weight", "meta", "cpu"]),
    (lambda x: pyllm.layer_norm([1.0], (8,)), TypeError, ["input", "list"]),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as e:
        call(torch.randn(4, 8))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the C++ CPU kernel's own argument checks")
def test_cpp_checks_do_not_crash():
    need("cpu")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError):
        torch.ops.pyllm.layer_norm_fwd(x, torch.ones(5), None, None, 1e-5, False)
    with pytest.raises(RuntimeError):
        torch.ops.pyllm.layer_norm_fwd(x.t(), None, None, None, 1e-5, False)  # stride(1) != 1
    with pytest.raises(RuntimeError):
        torch.ops.pyllm.layer_norm_bwd(x, x, None, torch.zeros(3), torch.zeros(4), None, False, False)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_dbias_keeps_its_own_dtype(backend, with_weight):
    """bf16 input, bf16 weight (or none) and an fp32 bias (mixed precision keeps fp32 biases): bias.grad is fp32
    and equals the fp32 sum of dy, not a value rounded to the weight's 16 bits."""
    need(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(48, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() if with_weight else None
    b = torch.randn(48, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(64, 48, generator=g).to(DEVICE, torch.bfloat16)
    pyllm.layer_norm(x, (48,), w, b, backend=backend).backward(dy)
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, dy.float().sum(0), rtol=1e-5, atol=1e-4)
    assert not torch.equal(b.grad, b.grad.bfloat16().float())  # bf16 rounding would be ~1e-2 off here
    if with_weight:
        assert w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [16, 1000])
def test_cpu_low_precision_parameter_grads_are_rounded_once(dtype, M):
    """The cpu kernel sums dweight / dbias in fp32 and stores them straight in the parameters' dtype: bitwise the
    fp32 parameters' gradients (the same fp32 sums) rounded once to 16 bits, at one row block (16 rows) and many."""
    need("cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, 768, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(M, 768, generator=g).to(dtype)
    w16, b16 = (torch.randn(768, generator=g).to(dtype).requires_grad_() for _ in range(2))
    w32, b32 = (t.detach().float().requires_grad_() for t in (w16, b16))
    dx16 = torch.autograd.grad(pyllm.layer_norm(x, (768,), w16, b16, backend="cpu"), [x, w16, b16], dy)
    dx32 = torch.autograd.grad(pyllm.layer_norm(x, (768,), w32, b32, backend="cpu"), [x, w32, b32], dy)
    assert dx16[1].dtype == dx16[2].dtype == dtype
    assert torch.equal(dx16[1], dx32[1].to(dtype)) and torch.equal(dx16[2], dx32[2].to(dtype))
