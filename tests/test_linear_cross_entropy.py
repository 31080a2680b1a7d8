"""Fused linear cross-entropy on every backend: FlashAttention's accuracy rule (loss and the gradients of
hidden, weight and bias; odd vocab sizes, ignored rows, smoothing, softcap, z-loss, several chunks),
F.cross_entropy semantics, torch.library (opcheck, torch.compile), and bad input."""
import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm.check import LCE_GRID, linear_cross_entropy_case
from tests.conftest import DEVICE, KERNEL_BACKENDS, need
from tests.test_layer_norm import assert_rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_rule(backend, dtype):
    need(backend)
    for i, (N, H, V, opts) in enumerate(LCE_GRID):
        assert_rows(linear_cross_entropy_case(backend, dtype, N, H, V, device=DEVICE, seed=i, **opts))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_same_as_torch_with_leading_dims(backend):
    """Semantics are F.linear + F.cross_entropy's (mean over non-ignored tokens, smoothing, bias)."""
    need(backend)
    h = torch.randn(3, 11, 20, device=DEVICE, requires_grad=True)  # (batch, seq, hidden)
    lin = torch.nn.Linear(20, 53, device=DEVICE)
    y = torch.randint(0, 53, (3, 11), device=DEVICE)
    y[1, 4:] = -100
    loss = pyllm.linear_cross_entropy(h, lin.weight, y, bias=lin.bias, label_smoothing=0.2, chunk_size=5,
                                      backend=backend)
    gh, gw, gb = torch.autograd.grad(3 * loss, (h, lin.weight, lin.bias))  # scaled by the incoming gradient
    ref = F.cross_entropy(lin(h).flatten(0, 1), y.flatten(), label_smoothing=0.2)
    rh, rw, rb = torch.autograd.grad(3 * ref, (h, lin.weight, lin.bias))
    assert loss.dtype == torch.float32 and loss.shape == ()
    for a, b in ((loss, ref), (gh, rh), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_all_ignored_gives_zero_not_nan(backend):
    need(backend)
    h = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(13, 8, device=DEVICE, requires_grad=True)
    loss = pyllm.linear_cross_entropy(h, w, torch.full((4,), -100, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_grad_gives_the_same_loss(backend):
    need(backend)
    h, w = torch.randn(9, 16, device=DEVICE), torch.randn(37, 16, device=DEVICE)
    y = torch.randint(0, 37, (9,), device=DEVICE)
    with torch.no_grad():
        a = pyllm.linear_cross_entropy(h, w, y, softcap=3.0, backend=backend)
    b = pyllm.linear_cross_entropy(h.requires_grad_(), w, y, softcap=3.0, backend=backend)
    torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 gradcheck is for the cpu backend")
def test_gradcheck_cpu_fp64():
    need("cpu")
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 8, -100, 3, 3])

    def f(h, w, b):
        return pyllm.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, softcap=2.0, z_loss=0.01,
                                          chunk_size=2, backend="cpu")

    assert torch.autograd.gradcheck(f, (h, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias_grad", [True, False])
def test_cpu_bias_in_the_row_step(dtype, bias_grad):
    """fp32/fp64 on the CPU add the bias while a row is in cache (at::mm, not at::addmm) and sum dbias per
    chunk: the same loss and gradients as F.linear + F.cross_entropy, for a strided bias (a column of a
    (V, 2) table) with or without a gradient, softcap and smoothing, chunks with a partial last one."""
    need("cpu")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 13, 24, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(67, 24, dtype=dtype, generator=g).div(3).requires_grad_()
    table = torch.randn(67, 2, dtype=dtype, generator=g).requires_grad_(bias_grad)
    b = table[:, 1]  # stride 2
    y = torch.randint(0, 67, (2, 13), generator=g)
    y[0, :4] = -100
    kw = dict(label_smoothing=0.05)
    loss = pyllm.linear_cross_entropy(h, w, y, bias=b, softcap=4.0, chunk_size=6, backend="cpu", **kw)
    logits = F.linear(h, w, b)
    ref = F.cross_entropy((4.0 * torch.tanh(logits / 4.0)).flatten(0, 1), y.flatten(), **kw)
    wrt = (h, w, table) if bias_grad else (h, w)
    got, want = torch.autograd.grad(loss, wrt), torch.autograd.grad(ref, wrt)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(loss, ref.to(loss.dtype), **tol)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, **tol)
    if bias_grad:
        assert not got[2][:, 0].any()  # only the bias column received a gradient


def _op(backend):
    ops = torch.ops.pyllm
    return ops.triton_linear_cross_entropy_fwd if backend == "triton" else ops.linear_cross_entropy_fwd


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    need(backend)
    h = torch.randn(7, 12, device=DEVICE, requires_grad=True)
    w = torch.randn(29, 12, device=DEVICE, requires_grad=True)
    b = torch.randn(29, device=DEVICE, requires_grad=True)
    y = torch.tensor([1, 2, -100, 28, 0, 5, 5], device=DEVICE)
    for args in [(h, w, y, b, -100, 0.1, 0.0, 0.0, True, 3, True), (h, w, y, None, -100, 0.0, 4.0, 1e-3, False, 0, True),
                 (h.detach(), w.detach(), y, None, -100, 0.0, 0.0, 0.0, True, 0, False)]:
        torch.library.opcheck(_op(backend), args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile(backend):
    need(backend)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, w, y):
        return pyllm.linear_cross_entropy(torch.tanh(h), w, y, z_loss=1e-3, backend=backend) * 2

    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(31, 16, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 31, (2, 5), device=DEVICE)
    f(h, w, y).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (pyllm.linear_cross_entropy(torch.tanh(h), w, y, z_loss=1e-3, backend="reference") * 2).backward()
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)


def test_cpu_one_logits_buffer_per_call_is_never_an_output():
    """The cpu kernel writes every chunk's logits into one buffer per call: calls of other dtypes, vocabularies
    and chunk counts, a partial last chunk and a 41 MB buffer all match F.linear + F.cross_entropy, and the
    gradients one call returned are not changed by the next."""
    need("cpu")
    op = _op("cpu")
    held = []
    for dtype, N, H, V, chunk in ((torch.float32, 600, 16, 5000, 0), (torch.float64, 70, 12, 301, 32),
                                  (torch.float32, 33, 8, 9001, 0), (torch.bfloat16, 40, 16, 777, 16),
                                  (torch.float32, 600, 8, 20000, 512)):  # 512 x 20000 fp32 logits: 41 MB
        g = torch.Generator().manual_seed(N + V)
        h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        w = torch.randn(V, H, generator=g, dtype=torch.float64).div(H ** 0.5).to(dtype).requires_grad_()
        y = torch.randint(0, V, (N,), generator=g)
        out = op(h, w, y, None, -100, 0.0, 0.0, 0.0, True, chunk, True)
        ref = F.cross_entropy(F.linear(h.double(), w.double()), y)
        rh, rw = torch.autograd.grad(ref, (h, w))
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0].double(), ref, **tol)
        torch.testing.assert_close(out[1].double(), rh.double(), **tol)
        torch.testing.assert_close(out[2].double(), rw.double(), **tol)
        held.append([t.detach().clone() for t in out[:3]] + [out[:3]])
    for *copies, outs in held:
        for c, t in zip(copies, outs):
            assert torch.equal(c, t.detach())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_scaling_keeps_retained_graphs_and_held_outputs(backend):
    """Backward returns the saved gradients unscaled (dloss == 1) or scales them in place only when autograd
    alone holds them and frees them after: a retained graph backpropagates again (after an in-place change of
    .grad, as gradient clipping does), and outputs of a direct op call are not changed by backward."""
    need(backend)
    h = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    w = torch.randn(23, 10, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 22, -100, 5, 5, 1], device=DEVICE)
    rh, rw = torch.autograd.grad(F.cross_entropy(F.linear(h, w), y), (h, w))
    for dloss in (1.0, 2.5):
        h.grad = w.grad = None
        loss = pyllm.linear_cross_entropy(h, w, y, chunk_size=4, backend=backend)
        (loss * dloss).backward(retain_graph=True)
        w.grad.mul_(0.5)
        (loss * dloss).backward(retain_graph=True)
        (loss * dloss).backward()
        torch.testing.assert_close(h.grad, 3 * dloss * rh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w.grad, 2.5 * dloss * rw, atol=1e-5, rtol=1e-5)
        out = _op(backend)(h, w, y, None, -100, 0.0, 0.0, 0.0, True, 0, True)
        kept = [t.detach().clone() for t in out[1:3]]
        gh, gw = torch.autograd.grad(out[0] * dloss, (h, w))
        for t, k in zip(out[1:3], kept):
            assert torch.equal(t.detach(), k)  # unchanged
        torch.testing.assert_close(gh, dloss * rh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, dloss * rw, atol=1e-5, rtol=1e-5)


def test_explain_and_mixed_dtypes():
    h, w, y = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    reasons = pyllm.backends.explain("linear_cross_entropy", h, w, y)
    assert reasons["reference"] == []
    loss = pyllm.linear_cross_entropy(h.bfloat16(), w, y)  # promoted to float32, as autocast's F.linear would not
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h.bfloat16().float(), w), y))


# ---- bad input: errors name the argument, the expected and the received
H, W, Y = (lambda: torch.randn(4, 8)), (lambda: torch.randn(10, 8)), (lambda: torch.tensor([1, 2, 3, -100]))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: pyllm.linear_cross_entropy(H(), torch.randn(10, 7), Y()), ValueError, ["hidden", "8", "(10, 7)"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y().int()), TypeError, ["labels", "int64", "int32"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y()[:3]), ValueError, ["labels", "(4,)", "(3,)"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), torch.tensor([1, 2, 10, 0])), ValueError, ["labels", "[0, 10)", "10"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y(), bias=torch.ones(9)), ValueError, ["bias", "(10,)", "(9,)"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y(), reduction="none"), ValueError, ["reduction", "'none'"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y(), softcap=-1.0), ValueError, ["softcap", "-1.0"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y(), label_smoothing=1.5), ValueError, ["label_smoothing", "1.5"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y(), z_loss=-0.1), ValueError, ["z_loss", "-0.1"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y(), chunk_size=0), ValueError, ["chunk_size", "0"]),
    (lambda: pyllm.linear_cross_entropy(H(), W(), Y(), backend="fast"), ValueError, ["backend", "'fast'"]),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the C++ CPU kernel's own argument checks")
def test_cpp_checks_do_not_crash():
    need("cpu")
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="out of range"):  # the op layer checks first; the kernel too
        torch.ops.pyllm.linear_cross_entropy_fwd(h, w, torch.tensor([1, 2, 99, 0]), None, -100, 0.0, 0.0, 0.0,
                                                 True, 0, True)
    with pytest.raises(RuntimeError, match="in_features"):
        torch.ops.pyllm.linear_cross_entropy_fwd(h, torch.randn(10, 9), torch.tensor([1, 2, 3, 0]), None, -100,
                                                 0.0, 0.0, 0.0, True, 0, True)
