"""Rotary embeddings on every backend: FlashAttention's accuracy rule (odd sizes, GQA head counts, partial
and interleaved rotary, per-batch tables), strided inputs, gradcheck, opcheck, torch.compile, the Llama
formula it replaces, and bad input."""
import pytest
import torch

import pyllm
from pyllm.check import rotary_case
from tests.conftest import DEVICE, KERNEL_BACKENDS, need

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, N, Hq, Hk, D, rotary_dim, interleaved, per-batch tables)
GRID = [(1, 1, 1, 1, 2, 2, False, False), (2, 17, 4, 2, 64, 64, False, False), (3, 13, 3, 1, 40, 24, True, True),
        (2, 9, 2, 2, 66, 66, True, False), (1, 31, 5, 5, 128, 64, False, True)]


def assert_rows(rows):
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n".join(f"{r.op} {r.backend} {r.dtype} {r.shape} {r.tensor}: {r.error:.3e} > {r.allowed:.3e}"
                              for r in bad)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_rule(backend, dtype):
    need(backend)
    grid = GRID[:3] if (backend == "triton" and DEVICE == "cpu") else GRID  # the interpreter is slow
    for i, (B, N, Hq, Hk, D, R, inter, per_batch) in enumerate(grid):
        assert_rows(rotary_case(backend, dtype, B, N, Hq, Hk, D, R, interleaved=inter, batch_tables=per_batch,
                                device=DEVICE, seed=i))


def _tables(B, N, R, dtype=torch.float32):
    theta = torch.arange(N, dtype=torch.float64)[:, None] * (500.0 ** (-torch.arange(0, R, 2) / R))
    return theta.cos().to(DEVICE, dtype), theta.sin().to(DEVICE, dtype)  # (N, R/2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_views_match_the_llama_formula(backend):
    """Slices of a packed qkv projection go in as views; the result is transformers' rotate_half formula."""
    need(backend)
    from pyllm.models.llama import apply_rotary

    B, N, Hq, Hk, D = 2, 7, 4, 2, 16
    qkv = torch.randn(B, N, (Hq + 2 * Hk) * D, device=DEVICE, requires_grad=True)
    q, k, _ = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)
    q, k = q.view(B, N, Hq, D), k.view(B, N, Hk, D)
    assert not q.is_contiguous()
    cos, sin = _tables(B, N, D)
    qo, ko = pyllm.rotary(q, k, cos, sin, backend=backend)
    torch.testing.assert_close(qo, apply_rotary(q, cos[None], sin[None]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, apply_rotary(k, cos[None], sin[None]), atol=1e-5, rtol=1e-5)
    (qo.square().sum() + ko.sum()).backward()
    g = qkv.grad.clone()
    qkv.grad = None
    qr, kr = pyllm.rotary(q, k, cos, sin, backend="reference")
    (qr.square().sum() + kr.sum()).backward()
    torch.testing.assert_close(g, qkv.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu"])
def test_gradcheck_fp64(backend):
    need(backend)
    q = torch.randn(1, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in _tables(1, 3, 4))
    for inter in (False, True):
        assert torch.autograd.gradcheck(lambda q, k: pyllm.rotary(q, k, cos, sin, interleaved=inter, backend=backend),
                                        (q, k))
        assert torch.autograd.gradgradcheck(
            lambda q, k: pyllm.rotary(q, k, cos, sin, interleaved=inter, backend=backend), (q, k))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    need(backend)
    op = torch.ops.pyllm.triton_rotary if backend == "triton" else torch.ops.pyllm.rotary
    q = torch.randn(2, 5, 3, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 1, 16, device=DEVICE, requires_grad=True)
    cos, sin = (t[None].contiguous() for t in _tables(2, 5, 12))
    for inter, conj in ((False, False), (True, True))[:1 if backend == "triton" else 2]:
        torch.library.opcheck(op, (q, k, cos, sin, inter, conj))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile(backend):
    need(backend)
    torch._dynamo.reset()
    cos, sin = _tables(2, 6, 16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k):
        qo, ko = pyllm.rotary(q, k, cos, sin, backend=backend)
        return (qo * 2).square().sum() + ko.sum()

    q = torch.randn(2, 6, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 6, 2, 16, device=DEVICE, requires_grad=True)
    f(q, k).backward()
    gq = q.grad.clone()
    q.grad = None
    qo, ko = pyllm.rotary(q, k, cos, sin, backend="reference")
    ((qo * 2).square().sum() + ko.sum()).backward()
    torch.testing.assert_close(gq, q.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("used", ["q", "k"])
def test_gradient_with_one_output_unused(backend, used):
    """Only one of (q_out, k_out) reaches the loss: the other input gets no (or a zero) gradient, the used one
    the reference's (the C++ autograd rotates the defined gradient alone)."""
    need(backend)
    B, N, D = 2, 5, 8
    grads = {}
    for who in (backend, "reference"):
        q = torch.randn(B, N, 3, D, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)).requires_grad_()
        k = torch.randn(B, N, 1, D, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1)).requires_grad_()
        cos, sin = _tables(B, N, D)
        qo, ko = pyllm.rotary(q, k, cos, sin, backend=who)
        ((qo if used == "q" else ko) * torch.arange(D, device=DEVICE)).sum().backward()
        grads[who] = (q.grad, k.grad)
    (gq, gk), (rq, rk) = grads[backend], grads["reference"]
    unused = gk if used == "q" else gq
    assert unused is None or not unused.any()  # none (C++ autograd) or zeros (torch.library's, materialized)
    torch.testing.assert_close(gq if used == "q" else gk, rq if used == "q" else rk, atol=1e-5, rtol=1e-5)


def test_cpu_autograd_is_registered_in_cpp():
    """pyllm::rotary's autograd is the C++ one (a decode step makes one call per layer; the Python wrapper cost
    ~10 us a call), and no Python kernel was registered over it."""
    need("cpu")
    import pyllm.ops._autograd  # noqa: F401  (registrations done)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyllm::rotary", "Autograd")
    autograd = [line for line in torch._C._dispatch_dump("pyllm::rotary").splitlines() if line.startswith("Autograd")]
    assert autograd and all("csrc/autograd.cpp" in line for line in autograd), autograd


def test_tables_that_require_grad_go_to_the_reference():
    backend = KERNEL_BACKENDS[0]
    need(backend)
    q, k = torch.randn(1, 4, 2, 8, device=DEVICE), torch.randn(1, 4, 2, 8, device=DEVICE)
    cos, sin = (t.requires_grad_() for t in _tables(1, 4, 8))
    reasons = pyllm.backends.explain("rotary", q, k, cos, sin)
    assert reasons["reference"] == [] and any("require grad" in r for r in reasons[backend])
    qo, ko = pyllm.rotary(q, k, cos, sin)
    (qo.sum() + ko.sum()).backward()
    assert cos.grad is not None and sin.grad is not None


def test_bad_input_names_the_argument():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 1, 8)
    cos, sin = _tables(2, 4, 8)
    with pytest.raises(ValueError, match=r"rotary: k has \(batch, seqlen, head_dim\) \(2, 4, 6\) "
                                         r"but q has \(2, 4, 8\)"):
        pyllm.rotary(q, torch.randn(2, 4, 1, 6), cos, sin)
    with pytest.raises(ValueError, match=r"rotary: cos has shape \(4, 5\); expected .* with 1 <= 2r <= head_dim 8"):
        pyllm.rotary(q, k, torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"rotary: sin has shape \(1, 4, 2\) but cos has \(4, 4\)"):
        pyllm.rotary(q, k, cos, torch.randn(1, 4, 2))
    with pytest.raises(TypeError, match="rotary: k has dtype float16 but q has float32"):
        pyllm.rotary(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="rotary: q must be 4-D"):
        pyllm.rotary(q[0], k, cos, sin)
