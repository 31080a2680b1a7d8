"""GELU's tanh approximation (``pyllm.gelu(approximate="tanh")``) on every backend: FlashAttention's accuracy rule
(odd sizes, both tails), gradcheck, opcheck, torch.compile, strided input, the exact form's routing, the GPT
block using it, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm.check import GELU_GRID, gelu_case
from tests.conftest import DEVICE, KERNEL_BACKENDS, need
from tests.test_rotary import assert_rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accuracy_rule(backend, dtype):
    need(backend)
    grid = GELU_GRID[:3] if (backend == "triton" and DEVICE == "cpu") else GELU_GRID  # the interpreter is slow
    for i, shape in enumerate(grid):
        assert_rows(gelu_case(backend, dtype, shape, device=DEVICE, seed=i))


def test_cpu_fp64_gradcheck_and_extremes():
    need("cpu")
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pyllm.gelu(t, "tanh", backend="cpu"), (x,))
    # tails: exp(-2u) overflows to inf (y -> -0) or underflows to 0 (y -> x); inf and nan as torch gives them
    t = torch.tensor([-1e13, -100.0, -20.0, 0.0, 20.0, 1e13, float("inf"), float("-inf"), float("nan")])
    got, want = pyllm.gelu(t, "tanh", backend="cpu"), F.gelu(t, approximate="tanh")
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_input_opcheck_and_compile(backend):
    need(backend)
    x = torch.randn(6, 10, device=DEVICE)[:, ::2].requires_grad_()  # not contiguous
    y = pyllm.gelu(x, "tanh", backend=backend)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), atol=2e-6, rtol=1e-5)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    F.gelu(x, approximate="tanh").square().sum().backward()
    torch.testing.assert_close(g, x.grad, atol=2e-5, rtol=1e-5)
    op = torch.ops.pyllm.triton_gelu_tanh_fwd if backend == "triton" else torch.ops.pyllm.gelu_tanh_fwd
    torch.library.opcheck(op, (torch.randn(5, 3, device=DEVICE, requires_grad=True),))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(t):
        return pyllm.gelu(t, "tanh") * 2

    t = torch.randn(4, 9, device=DEVICE)
    torch.testing.assert_close(f(t), 2 * F.gelu(t, approximate="tanh"), atol=2e-6, rtol=1e-5)


def test_exact_form_is_torch_and_explain_says_so():
    backend = KERNEL_BACKENDS[0]
    need(backend)
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    assert torch.equal(pyllm.gelu(x), F.gelu(x))
    why = pyllm.backends.explain("gelu", x)
    assert why.auto == "reference" and "F.gelu" in " ".join(why[backend])
    auto = pyllm.backends.explain("gelu", x, "tanh").auto
    # on CPU tensors the cpu kernel; on CUDA ones triton or cuda, by pyllm/verified.json (backends.auto_order)
    assert auto == "cpu" if DEVICE == "cpu" else auto in KERNEL_BACKENDS


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
        pyllm.gelu(torch.randn(3), "fast")
    with pytest.raises(TypeError, match="gelu: input must be a torch.Tensor"):
        pyllm.gelu([1.0, 2.0], "tanh")
    assert pyllm.gelu(torch.randn(0, 4), "tanh").shape == (0, 4)  # empty: served by the reference
