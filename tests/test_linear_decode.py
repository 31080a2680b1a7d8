"""pyllm.nn.Linear: few-row fp32 inference runs pyllm::linear_decode (the decode step's GEMV), held to the
accuracy rule against an fp64 reference; everything else is F.linear, unchanged."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from pyllm.accuracy import allowed_error, max_error, passes
from pyllm.nn import Linear
from pyllm.nn.linear import DECODE_MIN_ROWS, DECODE_ROWS

def _calls_kernel(fn) -> bool:
    with profile() as prof:
        fn()
    return any(e.name == "pyllm::linear_decode" for e in prof.events())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("K,N,bias", [(37, 7, True), (64, 130, False), (200, 33, True)])
def test_few_rows_match_fp64_within_the_rule(rows, K, N, bias, monkeypatch):
    import pyllm.nn.linear as linear

    monkeypatch.setattr(linear, "DECODE_MIN_ROWS", 1)  # one row too, whatever this CPU's default
    torch.manual_seed(rows * 1000 + K + N)
    m = Linear(K, N, bias=bias)
    x = torch.randn(rows, 1, K)  # (batch, one new token, features): a decode step
    with torch.no_grad():
        y = m(x)
        assert _calls_kernel(lambda: m(x))
        ref = F.linear(x.double(), m.weight.double(), None if m.bias is None else m.bias.double())
        base = F.linear(x, m.weight, m.bias)
    assert y.shape == (rows, 1, N) and y.dtype == torch.float32 and y.is_contiguous()
    err, allowed = max_error(y, ref), allowed_error(max_error(base, ref))
    assert passes(err, allowed), f"rows {rows} K {K} N {N}: error {err:.3g} > allowed {allowed:.3g}"


def test_training_more_rows_and_other_dtypes_are_f_linear_unchanged():
    torch.manual_seed(0)
    m = Linear(48, 24)
    x = torch.randn(3, 48, requires_grad=True)
    y = m(x)  # grad enabled: F.linear, with its gradients
    assert torch.equal(y, F.linear(x, m.weight, m.bias))
    y.sum().backward()
    assert m.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        for rows in (DECODE_ROWS + 1,) + ((1,) if DECODE_MIN_ROWS == 2 else ()):  # 1: where MKL's gemv streams
            other = torch.randn(rows, 48)
            assert not _calls_kernel(lambda: m(other))
            assert torch.equal(m(other), F.linear(other, m.weight, m.bias))
        assert torch.allclose(torch.ops.pyllm.linear_decode(x[:1].detach(), m.weight, m.bias), m(x[:1]), atol=1e-5)
        m64 = Linear(48, 24).double()
        x64 = torch.randn(2, 48, dtype=torch.float64)
        assert torch.equal(m64(x64), F.linear(x64, m64.weight, m64.bias))
        assert not _calls_kernel(lambda: Linear(48, 24, backend="reference")(x[:2].detach()))


@pytest.mark.parametrize("vendor, mkl, capability, one_row", [
    ("GenuineIntel", True, "AVX512", False),  # MKL's gemv streams at the memory bandwidth on Intel
    ("GenuineIntel", False, "AVX512", True),  # another BLAS: the kernel
    ("AuthenticAMD", True, "AVX512", True),  # MKL takes its generic path on other vendors
    ("", True, "AVX512", False),  # vendor unknown: torch's gemv, as before
    ("AuthenticAMD", True, "AVX2", False),  # no AVX-512: the kernel would hand the call to at::linear
])
def test_one_row_takes_the_kernel_where_torch_gemv_is_not_mkl_on_intel(vendor, mkl, capability, one_row,
                                                                        monkeypatch):
    import platform

    import pyllm.nn.linear as linear

    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert linear._cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls")

    monkeypatch.setattr(linear, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert linear._one_row_to_kernel() is one_row


def test_one_row_follows_decode_min_rows(monkeypatch):
    import pyllm.nn.linear as linear

    torch.manual_seed(4)
    m = Linear(64, 40)
    x = torch.randn(1, 64)
    with torch.no_grad():
        monkeypatch.setattr(linear, "DECODE_MIN_ROWS", 2)
        assert not _calls_kernel(lambda: m(x)) and torch.equal(m(x), F.linear(x, m.weight, m.bias))
        monkeypatch.setattr(linear, "DECODE_MIN_ROWS", 1)
        assert _calls_kernel(lambda: m(x))
        ref = F.linear(x.double(), m.weight.double(), m.bias.double())
        assert passes(max_error(m(x), ref), allowed_error(max_error(F.linear(x, m.weight, m.bias), ref)))
    assert linear.decode_min_rows() == 1


def test_same_parameters_and_state_dict_as_torch_linear_and_reads_the_current_weights():
    torch.manual_seed(1)
    ours, theirs = Linear(40, 20), torch.nn.Linear(40, 20)
    assert isinstance(ours, torch.nn.Linear)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 40)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    F.mse_loss(ours(x), torch.randn(4, 20)).backward()
    opt.step()  # the weights change in place: the kernel must read them, not a copy
    with torch.no_grad():
        ref = F.linear(x.double(), ours.weight.double(), ours.bias.double())
        err = max_error(ours(x), ref)
        assert passes(err, allowed_error(max_error(F.linear(x, ours.weight, ours.bias), ref)))
        assert max_error(theirs(x), ref) > 1e-3  # the old weights give other outputs


def test_op_errors_name_the_shapes():
    with pytest.raises(RuntimeError, match="linear_decode: x must be"):
        torch.ops.pyllm.linear_decode(torch.randn(2, 5), torch.randn(3, 4), None)
    with pytest.raises(RuntimeError, match="linear_decode: bias must be"):
        torch.ops.pyllm.linear_decode(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4))


def test_compiled_graph_calls_the_kernel():
    torch.manual_seed(2)
    m = Linear(32, 12)
    x = torch.randn(3, 1, 32)
    with torch.no_grad():
        want = m(x)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), want)  # the same kernel inside the graph: the same numbers
        assert _calls_kernel(lambda: compiled(x))


def test_generation_after_a_training_step_runs_the_kernel_on_the_new_weights(monkeypatch):
    """A Llama decoder trained one step, then generating: the decode steps' projections and LM head run the
    kernel (on the updated weights, nothing cached from before the step) and give F.linear's tokens."""
    import pyllm.nn.linear as linear
    from pyllm.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=48, max_position_embeddings=64))
    ids = torch.randint(0, 97, (2, 9))
    before = model.eval().generate(ids, max_new_tokens=8)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    assert _calls_kernel(lambda: model.generate(ids, max_new_tokens=8))
    fast = model.generate(ids, max_new_tokens=8)
    monkeypatch.setattr(linear, "_READY", False)  # every Linear is F.linear
    assert not _calls_kernel(lambda: model.generate(ids, max_new_tokens=8))
    assert torch.equal(fast, model.generate(ids, max_new_tokens=8))
    assert not torch.equal(fast, before)  # the step changed the model, and generation saw it
