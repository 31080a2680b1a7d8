"""Attention on every backend: FlashAttention's accuracy rule over causal x padding x GQA x Nq != Nk x head
dims x dtypes x odd seqlens; determinism; torch.library (opcheck, torch.compile); bad input."""
import functools
import itertools

import pytest
import torch

import pyllm
from pyllm.check import attention_case
from tests.conftest import DEVICE, KERNEL_BACKENDS, need

INTERP = DEVICE == "cpu"  # the Triton kernels run under the interpreter on CPU tensors


def assert_rows(rows):
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n".join(f"{r.backend} {r.dtype} {r.shape} {r.tensor}: {r.error:.3e} > {r.allowed:.3e}"
                              for r in bad)


def _grid(big: bool):
    """A covering grid: every head dim and every seqlen meets causal, padding, GQA and Nq != Nk."""
    head_dims = [16, 40, 64, 96, 128, 256]
    seqlens = [1, 17, 113, 1000] if big else [1, 17, 113]
    cases = []
    for i, (D, N) in enumerate(itertools.product(head_dims, seqlens)):
        causal, padded, gqa, cross = i % 2 == 0, i % 3 == 0, i % 4 < 2, i % 5 < 2
        Nq = N
        Nk = (N + 13 if i % 2 else max(N - 7, 1)) if cross else N
        if N == 1000 and D >= 128:
            Nq = 129  # keep the fp64 reference's memory and time in bounds
        Hq, Hkv = (4, 2) if gqa else ((2, 1) if i % 7 == 0 else (2, 2))
        cases.append((2 if N < 1000 else 1, Nq, Nk, Hq, Hkv, D, causal, padded))
    return cases


CPU_CASES = _grid(big=True)
TRITON_CASES = [  # the interpreter is slow: small but still covering every feature
    (2, 17, 17, 2, 2, 16, True, False),
    (2, 17, 29, 4, 2, 40, False, True),
    (1, 1, 33, 4, 1, 64, True, False),
    (2, 33, 17, 2, 1, 64, True, True),
    (1, 9, 9, 2, 2, 128, False, False),
    (1, 21, 19, 2, 2, 96, True, True),
    (1, 7, 11, 2, 1, 256, False, False),
    (1, 113, 113, 2, 2, 64, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_accuracy_rule(backend, dtype):
    need(backend)
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA attention takes fp16/bf16; explain() routes fp32 elsewhere (tested below)")
    cases = TRITON_CASES if (backend == "triton" and INTERP) else CPU_CASES
    if backend == "reference":
        cases = cases[::4]
    for seed, (B, Nq, Nk, Hq, Hkv, D, causal, padded) in enumerate(cases):
        assert_rows(attention_case(backend, dtype, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded,
                                   device=DEVICE, seed=seed))


@pytest.mark.skipif(not INTERP, reason="one fp64 case for the cpu backend")
def test_cpu_fp64_gradcheck():
    need("cpu")
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 6 + [False]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: pyllm.attention(q, k, v, causal=True, key_padding_mask=mask, backend="cpu"), (q, k, v))


def _cpu_has_amx_bf16() -> bool:
    """The cpu backend's own condition for its AMX kernels: the CPU flags, and Linux granting the tile state
    (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), which kernels before 5.16 refuse)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    if not {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"} <= flags:
        return False
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return False
    sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    return ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, req_xcomp_perm, xfeature_xtiledata) == 0


@pytest.mark.skipif(not INTERP, reason="the cpu backend's bf16 kernels without AMX")
def test_cpu_bf16_without_amx_meets_the_rule(monkeypatch):
    """PYLLM_CPU_AMX=0 gives the bf16 forward and backward that CPUs without AMX run (K/V widened to fp32, FMA
    products): they meet the accuracy rule over the grid, as the AMX kernels do in test_accuracy_rule."""
    need("cpu")
    monkeypatch.setenv("PYLLM_CPU_AMX", "0")
    for seed, (B, Nq, Nk, Hq, Hkv, D, causal, padded) in enumerate(CPU_CASES[::2]):
        assert_rows(attention_case("cpu", torch.bfloat16, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded,
                                   device="cpu", seed=seed))


@pytest.mark.skipif(not INTERP or not _cpu_has_amx_bf16(), reason="needs a CPU with AMX-BF16 (Sapphire Rapids on)")
@pytest.mark.parametrize("features", [{}, {"window_size": (9, 0)}, {"softcap": 5.0}, {"dropout_p": 0.2}])
def test_cpu_bf16_runs_on_amx(monkeypatch, features):
    """On an AMX CPU the bf16 forward and backward are the tile kernels: they round P (and dS) to bf16 for their
    products (as SDPA's bf16 kernels do), so they differ from the widened path in the last bits, and are about as
    close to the fp32 reference (the accuracy rule itself is test_accuracy_rule's)."""
    need("cpu")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 77, 4, 80, generator=g).bfloat16()
    k, v = (torch.randn(2, 90, 2, 80, generator=g).bfloat16() for _ in range(2))
    do = torch.randn(2, 77, 4, 80, generator=g).bfloat16()
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[1, 61:] = False

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(0)  # the same dropout mask on every path
        o = fn(*leaves, causal=True, key_padding_mask=mask, **features)
        o.backward(do.to(dtype))
        return [o] + [t.grad for t in leaves]

    cpu = functools.partial(pyllm.attention, backend="cpu")
    tiles = run(cpu, torch.bfloat16)
    monkeypatch.setenv("PYLLM_CPU_AMX", "0")
    widened = run(cpu, torch.bfloat16)
    ref = run(pyllm.reference.attention, torch.float32)
    for name, a, w, r in zip(("out", "dq", "dk", "dv"), tiles, widened, ref):
        assert not torch.equal(a, w), name
        err_tiles, err_widened = ((x.float() - r).abs().max().item() for x in (a, w))
        assert err_widened < 0.1 and err_tiles <= 3 * err_widened + 1e-5, (name, err_tiles, err_widened)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rows_without_keys_are_zero_not_nan(backend, device):
    need(backend)
    dtype = torch.float32 if backend != "cuda" else torch.float16
    q = torch.randn(2, 6, 2, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 4, 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 4, 2, 32, device=device, dtype=dtype, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False] * 4], device=device)
    # causal bottom-right with Nq=6 > Nk=4: queries 0 and 1 see no key; batch row 1 sees nothing at all
    o, lse = pyllm.attention(q, k, v, causal=True, key_padding_mask=mask, return_lse=True, backend=backend)
    assert torch.isfinite(o).all()
    assert (o[1] == 0).all() and (o[0, :2] == 0).all()
    assert torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    o.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_inputs_no_copies_needed(backend, device):
    need(backend)
    dtype = torch.float32 if backend != "cuda" else torch.float16
    qkv = torch.randn(2, 37, 3, 4, 32, device=device, dtype=dtype)  # a packed projection
    q, k, v = qkv.unbind(2)  # (B, N, H, D) views with stride(1) = 3*4*32
    o = pyllm.attention(q, k, v, causal=True, backend=backend)
    ref = pyllm.reference.attention(q, k, v, causal=True)
    torch.testing.assert_close(o, ref, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    qt = torch.randn(2, 4, 37, 32, device=device, dtype=dtype).transpose(1, 2)  # (B, H, N, D) storage
    o = pyllm.attention(qt, k, v, backend=backend)
    torch.testing.assert_close(o, pyllm.reference.attention(qt, k, v), atol=2e-3 if dtype == torch.float16 else 1e-5,
                               rtol=1e-3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic_backward(backend, device):
    need(backend)
    dtype = torch.float32 if backend != "cuda" else torch.float16
    q = torch.randn(2, 65, 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 77, 2, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 77, 2, 64, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(2, 65, 4, 64, device=device, dtype=dtype)
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            o = pyllm.attention(q, k, v, causal=True, backend=backend)
            grads.append(torch.autograd.grad(o, (q, k, v), do))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    need(backend)
    dtype = torch.float32 if backend != "cuda" else torch.float16
    op = torch.ops.pyllm.triton_attention_fwd if backend == "triton" else torch.ops.pyllm.attention_fwd
    q = torch.randn(1, 9, 2, 16, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 11, 1, 16, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 11, 1, 16, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(1, 11, dtype=torch.bool, device=device)
    mask[0, -3:] = False
    for args in ((q, k, v, None, True, 0.25), (q, k, v, mask, False, 0.25)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile(backend, device):
    need(backend)
    torch._dynamo.reset()
    dtype = torch.float32 if backend != "cuda" else torch.float16

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return pyllm.attention(q, k, v, causal=True, backend=backend).float().square().sum()

    q, k, v = (torch.randn(1, 13, 2, 16, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    f(q, k, v).backward()
    g = q.grad.clone()
    q.grad = None
    pyllm.reference.attention(q, k, v, causal=True).float().square().sum().backward()
    torch.testing.assert_close(g, q.grad, atol=2e-2 if dtype == torch.float16 else 1e-4, rtol=1e-3)


def test_auto_and_explain(device):
    for b in KERNEL_BACKENDS:
        need(b)
    q = torch.randn(1, 5, 2, 300, device=device)
    reasons = pyllm.backends.explain("attention", q, q, q)
    assert reasons["reference"] == []
    for b in KERNEL_BACKENDS:
        assert any("head_dim 300" in r for r in reasons[b]), reasons[b]
    o = pyllm.attention(q, q, q)  # auto falls back to the reference
    torch.testing.assert_close(o, pyllm.reference.attention(q, q, q))
    with pytest.raises(ValueError, match="head_dim 300"):
        pyllm.attention(q, q, q, backend=KERNEL_BACKENDS[0])


@pytest.mark.parametrize("call,exc,words", [
    (lambda q, k, v: pyllm.attention(q, k[:1], v[:1]), ValueError, ["k has batch 1", "q has 2"]),
    (lambda q, k, v: pyllm.attention(q, k[..., :8], v), ValueError, ["k has head_dim 8", "q has 16"]),
    (lambda q, k, v: pyllm.attention(q, k.half(), v), TypeError, ["k", "float16", "float32"]),
    (lambda q, k, v: pyllm.attention(q, torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16)), ValueError,
     ["multiple", "(4)", "(3)"]),
    (lambda q, k, v: pyllm.attention(q, k, v[:, :5]), ValueError, ["v", "k"]),
    (lambda q, k, v: pyllm.attention(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
     ["key_padding_mask", "(2, 7)", "(2, 6)"]),
    (lambda q, k, v: pyllm.attention(q, k, v, key_padding_mask=torch.ones(2, 7)), TypeError,
     ["key_padding_mask", "bool", "float32"]),
    (lambda q, k, v: pyllm.attention(q[0], k, v), ValueError, ["q", "4-D", "3-D"]),
    (lambda q, k, v: pyllm.attention(q, k.to("meta"), v), ValueError, ["k", "meta", "cpu"]),
    (lambda q, k, v: pyllm.attention(q, k, v, backend="flash"), ValueError, ["backend", "'flash'"]),
    (lambda q, k, v: pyllm.attention(q.int(), k, v), TypeError, ["q", "int32"]),
])
def test_bad_input(call, exc, words):
    q = torch.randn(2, 5, 4, 16)
    k = v = torch.randn(2, 7, 2, 16)
    with pytest.raises(exc) as e:
        call(q, k, v)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.skipif(not INTERP, reason="checks the C++ CPU kernel's own argument checks")
def test_cpp_checks_do_not_crash():
    need("cpu")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError):
        torch.ops.pyllm.attention_fwd(q, q[:, :, :1].expand(1, 4, 3, 16), q, None, False, 1.0)
    with pytest.raises(RuntimeError):
        torch.ops.pyllm.attention_fwd(q, q, q, torch.ones(1, 3, dtype=torch.bool), False, 1.0)
    with pytest.raises(RuntimeError):
        torch.ops.pyllm.attention_fwd(q.transpose(-1, -2), q, q, None, False, 1.0)
