"""FlashAttention's feature set: dropout (Philox, the same mask on every backend), packed sequences, sliding
window, softcap, ALiBi, additive bias with gradient, attention maps, the SDPA drop-in's mapping, bad input.

Backends are tested on the features they declare (``attention_features`` in pyllm/capabilities.py); for the
others the test checks that they decline with a reason and that auto still answers (from the next backend or
the reference).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm import reference
from pyllm.check import FEATURE_CASES, VARLEN_CASES, _feature_names, attention_case, varlen_case
from tests.conftest import DEVICE, KERNEL_BACKENDS, need
from tests.test_attention import assert_rows

FEATURES = ("dropout", "window", "softcap", "alibi", "attn_bias", "varlen")


def feats(backend: str) -> set[str]:
    """The attention features ``backend``'s kernels declare (pyllm/capabilities.py)."""
    return set(pyllm.capabilities.TABLES[backend].attention_features)


def serving(feature: str) -> list[str]:
    """reference plus the kernel backends that declare ``feature``."""
    return ["reference"] + [b for b in KERNEL_BACKENDS if feature in feats(b)]


def _dtype(backend):
    return torch.float16 if backend == "cuda" else torch.float32


# ---------------------------------------------------------------- dropout
def test_philox_known_answer_and_triton_match():
    # Random123's known-answer vector for philox4x32-10, counter 0, key 0: word 0 = 0x6627e8d5
    assert reference.philox_bits(0, torch.tensor([0])).item() == 0x6627E8D5
    if "triton" not in pyllm.backends.available():
        return
    import triton
    import triton.language as tl

    @triton.jit
    def bits(out, seed, offset, N: tl.constexpr):
        i = tl.arange(0, N).to(tl.int64)
        tl.store(out + i, tl.randint(seed, offset + i).to(tl.int64) & 0xFFFFFFFF)

    seed, offset = 0x123456789ABCDEF, (1 << 33) + 5  # both 32-bit halves of seed and counter in play
    out = torch.empty(64, dtype=torch.int64, device=DEVICE)
    bits[(1,)](out, seed, offset, 64)
    assert torch.equal(out.cpu(), reference.philox_bits(seed, torch.arange(64) + offset))


@pytest.mark.parametrize("backend", serving("dropout"))
def test_dropout_mask_is_the_reference_mask_exactly(backend):
    """v = one-hot over keys makes out[b, i, h, j] = p_ij * keep_ij / (1 - p): the mask can be read off."""
    B, Nq, Nk, H, D, p = 2, 11, 13, 3, 16, 0.3
    dtype = _dtype(backend)
    q = torch.randn(B, Nq, H, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Nk, H, D, device=DEVICE, dtype=dtype)
    v = torch.eye(Nk, D, device=DEVICE, dtype=dtype)[None, :, None, :].expand(B, Nk, H, D).contiguous()
    torch.manual_seed(7)
    o = pyllm.attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(7)
    keep = reference.dropout_mask(*reference.draw_dropout_seed(), p, B, H, Nq, Nk, device=DEVICE)
    got = o[..., :Nk].permute(0, 2, 1, 3) != 0  # (B, H, Nq, Nk)
    assert torch.equal(got, keep)
    assert 0.15 < 1 - keep.float().mean().item() < 0.45


def test_dropout_reproducible_and_statistics():
    q, k, v = (torch.randn(2, 64, 2, 16, device=DEVICE) for _ in range(3))
    torch.manual_seed(1)
    a = pyllm.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(1)
    b = pyllm.attention(q, k, v, dropout_p=0.2)
    c = pyllm.attention(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep = reference.dropout_mask(123, 456, 0.2, 4, 8, 64, 64)
    assert abs(keep.float().mean().item() - 0.8) < 0.01  # 131072 draws: 5 sigma is 0.0055
    assert reference.dropout_threshold(0.0) == 0 and reference.dropout_mask(1, 2, 0.0, 1, 1, 4, 4).all()


# ---------------------------------------------------------------- accuracy rule on every serving backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_features_accuracy_rule(backend, dtype):
    need(backend)
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA attention takes fp16/bf16")
    have = feats(backend) if backend != "reference" else set(FEATURES)
    # the interpreter is slow: fp16/bf16 there run the case with every feature at once, fp32 runs them all
    few = backend == "triton" and DEVICE == "cpu" and dtype != torch.float32
    ran = 0
    for seed, (kw, (B, Nq, Nk, Hq, Hkv, D, causal, padded)) in enumerate(FEATURE_CASES):
        if few and len(kw) < 5:
            continue
        if all(f in have for f in _feature_names(kw)):
            assert_rows(attention_case(backend, dtype, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded,
                                       device=DEVICE, seed=seed, **kw))
            ran += 1
    for seed, (lq, lk, Hq, Hkv, D, causal, kw) in enumerate(VARLEN_CASES):
        if few and not kw:
            continue
        if all(f in have for f in ["varlen"] + _feature_names(kw)):
            assert_rows(varlen_case(backend, dtype, lq, lk, Hq, Hkv, D, causal=causal, device=DEVICE, seed=seed,
                                    **kw))
            ran += 1
    if ran == 0:  # nothing declared: every feature must be declined with a reason, and auto must still serve
        q = torch.randn(1, 5, 2, 16, device=DEVICE, dtype=dtype)
        for kw in (dict(dropout_p=0.1), dict(window_size=(2, 2)), dict(softcap=1.0),
                   dict(alibi_slopes=torch.ones(2, device=DEVICE)), dict(attn_bias=torch.zeros(5, 5, device=DEVICE))):
            reasons = pyllm.backends.explain("attention", q, q, q, **kw)[backend]
            assert any("not implemented" in r for r in reasons), (kw, reasons)
            assert pyllm.attention(q, q, q, **kw).shape == q.shape


# ---------------------------------------------------------------- semantics, against torch itself
def _bottom_right(Nq, Nk, left, right):
    d = torch.arange(Nk)[None, :] - torch.arange(Nq)[:, None] - (Nk - Nq)
    ok = torch.ones(Nq, Nk, dtype=torch.bool)
    if right >= 0:
        ok &= d <= right
    if left >= 0:
        ok &= d >= -left
    return ok, d


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_window_softcap_alibi_bias_match_torch_sdpa(backend):
    """Each feature written out in torch's own ops and SDPA (an independent implementation), in fp64."""
    if backend != "auto":
        need(backend)
    B, Nq, Nk, H, D = 2, 19, 23, 2, 16
    q, k, v = (torch.randn(B, n, H, D, dtype=torch.float64, requires_grad=True) for n in (Nq, Nk, Nk))
    slopes = torch.tensor([0.3, 0.7])
    bias = torch.randn(1, H, Nq, Nk, dtype=torch.float64, requires_grad=True)
    cap, scale = 2.0, D**-0.5
    ok, d = _bottom_right(Nq, Nk, 4, 1)
    mask = torch.where(ok, 0.0, -math.inf).double() - slopes[:, None, None].double() * d.abs() + bias

    def torch_side(q, k, v):  # softcap has to be applied to the scores, so write the scores out
        s = cap * torch.tanh(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale / cap) + mask
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    kw = dict(window_size=(4, 1), softcap=cap, alibi_slopes=slopes, attn_bias=bias)
    want = feats(backend) if backend != "auto" else set(FEATURES)
    if not {"window", "softcap", "alibi", "attn_bias"} <= set(want):
        with pytest.raises(ValueError, match="not implemented"):
            pyllm.attention(q, k, v, backend=backend, **kw)
        return
    o = pyllm.attention(q, k, v, backend=None if backend == "auto" else backend, **kw)
    ref = torch_side(q, k, v)
    torch.testing.assert_close(o, ref)
    do = torch.randn_like(o)
    g1 = torch.autograd.grad(o, (q, k, v, bias), do)
    g2 = torch.autograd.grad(ref, (q, k, v, bias), do)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    # the window alone against torch's SDPA with the equivalent bool mask
    o = pyllm.attention(q, k, v, window_size=(4, 1), backend=None if backend == "auto" else backend)
    sd = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=ok).transpose(1, 2)
    torch.testing.assert_close(o, sd)


def test_bias_gradient_reduced_over_broadcast_dims():
    q, k, v = (torch.randn(3, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    for shape in [(1, 2, 5, 5), (3, 1, 1, 5), (5, 5), (1, 1, 5, 1)]:
        bias = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda b: pyllm.attention(q, k, v, attn_bias=b), (bias,), fast_mode=True)
        pyllm.attention(q, k, v, attn_bias=bias).sum().backward()
        assert bias.grad.shape == bias.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gradient_summed_over_the_batch_in_the_kernel(dtype):
    """cpu: a bias shared by the batch has its gradient accumulated by tasks that own every sequence (no
    (B, H, Nq, Nk) buffer); with GQA and one kv head the query blocks are split across tasks too."""
    need("cpu")
    rows = []
    for B, Nq, Nk, Hq, Hkv, D, bias_shape in [(3, 37, 45, 4, 1, 24, (1, 4, 37, 45)),
                                              (2, 130, 200, 2, 2, 64, (1, 1, 130, 200)),
                                              (3, 21, 29, 2, 2, 16, (3, 1, 21, 29))]:
        rows += attention_case("cpu", dtype, B, Nq, Nk, Hq, Hkv, D, causal=True, padded=B == 3,
                               bias_shape=bias_shape)
    assert_rows(rows)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "cuda"])
def test_fp64_gradcheck_every_feature(backend):
    """The kernel's own backward (dropout mask regenerated, softcap's 1 - tanh^2, window, ALiBi, bias)."""
    need(backend)
    if not set(FEATURES) - {"varlen"} <= feats(backend):
        with pytest.raises(ValueError, match="not implemented"):
            pyllm.attention(*(torch.randn(1, 3, 1, 8, dtype=torch.float64),) * 3, dropout_p=0.1, backend=backend)
        return
    if "float64" not in pyllm.capabilities.TABLES[backend].dtypes:
        return
    q = torch.randn(2, 6, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 1, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 1, 6, 9, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias):
        torch.manual_seed(11)  # the same dropout mask on every evaluation
        return pyllm.attention(q, k, v, causal=True, dropout_p=0.2, window_size=(4, -1), softcap=1.5,
                               alibi_slopes=torch.tensor([0.2, 0.5]), attn_bias=bias, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, bias), fast_mode=True)


def test_window_with_causal_and_rows_without_keys():
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    mask = torch.tensor([[True] * 3 + [False] * 6])
    o, lse = pyllm.attention(q, k, v, causal=True, window_size=(2, 5), key_padding_mask=mask, return_lse=True)
    ok, _ = _bottom_right(9, 9, 2, 0)  # causal makes right = 0
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                         attn_mask=ok & mask[0]).transpose(1, 2)
    seen = (ok & mask[0]).any(-1)  # rows 5.. see no key: zeros there, torch NaN
    torch.testing.assert_close(o[:, seen], ref[:, seen])
    assert (o[:, ~seen] == 0).all() and torch.isinf(lse[..., ~seen]).all()


# ---------------------------------------------------------------- packed sequences
@pytest.mark.parametrize("backend", serving("varlen"))
def test_varlen_equals_padded(backend):
    """Self-attention, right-padded: varlen == padded with a key-padding mask, dropout mask included."""
    lens, H, D = [6, 1, 11, 0, 4], 2, 16
    Bn, N = len(lens), max(lens)
    dtype = _dtype(backend)
    qp, kp, vp = (torch.randn(Bn, N, H, D, device=DEVICE, dtype=dtype) for _ in range(3))
    valid = torch.arange(N)[None, :] < torch.tensor(lens)[:, None]
    pack = lambda t: t[valid].detach().requires_grad_()  # noqa: E731
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(DEVICE)
    for causal in (False, True):
        q, k, v = pack(qp), pack(kp), pack(vp)
        torch.manual_seed(3)
        o = pyllm.attention_varlen(q, k, v, cu, cu, N, N, causal=causal, dropout_p=0.25, backend=backend)
        qq, kk, vv = (t.detach().requires_grad_() for t in (qp, kp, vp))
        torch.manual_seed(3)
        op = pyllm.attention(qq, kk, vv, causal=causal, dropout_p=0.25, key_padding_mask=valid.to(DEVICE),
                             backend="reference")
        tol = dict(atol=2e-3, rtol=2e-3) if dtype != torch.float32 else {}
        torch.testing.assert_close(o, op[valid], **tol)
        do = torch.randn_like(o)
        dop = torch.zeros_like(op)
        dop[valid] = do
        g = torch.autograd.grad(o, (q, k, v), do)
        gp = torch.autograd.grad(op, (qq, kk, vv), dop)
        for a, b in zip(g, gp):
            torch.testing.assert_close(a, b[valid], **tol)


# ---------------------------------------------------------------- attention maps
def test_attention_probs():
    B, Nq, Nk, Hq, Hkv, D = 2, 9, 12, 4, 2, 16
    q, k, v = torch.randn(B, Nq, Hq, D), torch.randn(B, Nk, Hkv, D), torch.randn(B, Nk, Hkv, D)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[1, 5:] = False
    kw = dict(causal=True, key_padding_mask=mask, softcap=3.0, alibi_slopes=torch.rand(Hq),
              attn_bias=torch.randn(1, Hq, Nq, Nk))
    o, lse = pyllm.attention(q, k, v, return_lse=True, **kw)
    p = pyllm.attention_probs(q, k, **kw)
    p_lse = pyllm.attention_probs(q, k, lse=lse, heads=[3, 1], **kw)
    assert p.shape == (B, Hq, Nq, Nk) and p_lse.shape == (B, 2, Nq, Nk)
    torch.testing.assert_close(p_lse, p[:, [3, 1]])
    # the maps reproduce the output: o = P V
    vq = v.repeat_interleave(Hq // Hkv, dim=2)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", p, vq), o, atol=1e-5, rtol=1e-4)
    # the plain case against torch's softmax
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * D**-0.5
    torch.testing.assert_close(pyllm.attention_probs(q, k), s.softmax(-1))


# ---------------------------------------------------------------- the SDPA drop-in
def test_sdpa_maps_dropout_and_masks_onto_attention():
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    fmask = torch.randn(2, 1, 10, 10)
    bmask = torch.rand(10, 10) > 0.4
    bmask[:, 0] = True
    for m in (fmask, bmask):
        torch.testing.assert_close(pyllm.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m))
    reasons = pyllm.backends.explain("scaled_dot_product_attention", q, k, v, attn_mask=fmask, dropout_p=0.1)
    assert reasons["reference"] == []
    for b in KERNEL_BACKENDS:
        have = feats(b)
        if not {"dropout", "attn_bias"} <= have:
            assert any("not implemented" in r for r in reasons[b]), reasons[b]
        else:  # fused: the kernel backend serves it
            assert reasons[b] == [], reasons[b]
    # dropout goes through pyllm's Philox dropout: the same as pyllm.attention with the same seed
    torch.manual_seed(5)
    o = pyllm.scaled_dot_product_attention(q, k, v, attn_mask=fmask, dropout_p=0.3)
    torch.manual_seed(5)
    want = pyllm.attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_bias=fmask, dropout_p=0.3)
    torch.testing.assert_close(o, want.transpose(1, 2))


def test_torch_compile_reference_features():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, b):
        return pyllm.attention(q, k, v, window_size=(3, 2), softcap=2.0, attn_bias=b, backend="reference").sum()

    q, k, v = (torch.randn(1, 9, 2, 8, requires_grad=True) for _ in range(3))
    b = torch.randn(1, 2, 9, 9, requires_grad=True)
    f(q, k, v, b).backward()
    gb = b.grad.clone()
    b.grad = None
    pyllm.attention(q, k, v, window_size=(3, 2), softcap=2.0, attn_bias=b, backend="reference").sum().backward()
    torch.testing.assert_close(gb, b.grad)


# ---------------------------------------------------------------- bad input
def _cu(*x, dtype=torch.int32):
    return torch.tensor(x, dtype=dtype)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)", "1.0"]),
    (dict(dropout_p=-0.1), ValueError, ["dropout_p", "-0.1"]),
    (dict(dropout_p=float("nan")), ValueError, ["dropout_p", "nan"]),
    (dict(window_size=(-2, 0)), ValueError, ["window_size", ">= -1", "(-2, 0)"]),
    (dict(window_size=3), ValueError, ["window_size", "(left, right)", "3"]),
    (dict(softcap=-1.0), ValueError, ["softcap", ">= 0", "-1.0"]),
    (dict(softcap=float("nan")), ValueError, ["softcap", "nan"]),
    (dict(alibi_slopes=torch.ones(3)), ValueError, ["alibi_slopes", "(4,)", "(3,)"]),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, ["alibi_slopes", "float32", "int64"]),
    (dict(attn_bias=torch.zeros(2, 4, 5, 6)), ValueError, ["attn_bias", "(2, 4, 5, 7)", "(2, 4, 5, 6)"]),
    (dict(attn_bias=torch.zeros(3, 1, 1, 7)), ValueError, ["attn_bias", "(3, 1, 1, 7)"]),
    (dict(attn_bias=torch.zeros(7)), ValueError, ["attn_bias", "(7,)"]),
])
def test_bad_feature_input(kw, exc, words):
    q = torch.randn(2, 5, 4, 16)
    k = v = torch.randn(2, 7, 2, 16)
    with pytest.raises(exc) as e:
        pyllm.attention(q, k, v, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("args,exc,words", [
    ((_cu(0, 3, 8, dtype=torch.int64), _cu(0, 4, 9), 5, 5), TypeError, ["cu_seqlens_q", "int32", "int64"]),
    ((_cu(1, 3, 8), _cu(0, 4, 9), 5, 5), ValueError, ["cu_seqlens_q", "start at 0", "1"]),
    ((_cu(0, 5, 3, 8), _cu(0, 4, 4, 9), 5, 5), ValueError, ["cu_seqlens_q", "non-decreasing"]),
    ((_cu(0, 3, 7), _cu(0, 4, 9), 5, 5), ValueError, ["cu_seqlens_q", "ends at 7", "8"]),
    ((_cu(0, 3, 8), _cu(0, 4, 9), 4, 5), ValueError, ["max_seqlen_q", "longest", "(5)", "4"]),
    ((_cu(0, 3, 8), _cu(0, 9), 5, 9), ValueError, ["cu_seqlens_k", "2 entries", "3"]),
])
def test_bad_varlen_input(args, exc, words):
    q = torch.randn(8, 4, 16)
    k = v = torch.randn(9, 2, 16)
    with pytest.raises(exc) as e:
        pyllm.attention_varlen(q, k, v, *args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_probs_input():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"heads must be ints in \[0, 2\), got \[2\]"):
        pyllm.attention_probs(q, q, heads=[0, 2])
    with pytest.raises(ValueError, match=r"lse must have shape .* \(1, 2, 5\), got \(1, 5\)"):
        pyllm.attention_probs(q, q, lse=torch.zeros(1, 5))


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "cuda"])
def test_opcheck_and_compile_feature_ops(backend):
    need(backend)
    if not {"dropout", "window", "softcap", "alibi", "attn_bias"} <= feats(backend):
        pytest.skip(f"{backend} has no fused feature op (its calls are served elsewhere; tested above)")
    op = torch.ops.pyllm.triton_attention_ext_fwd if backend == "triton" else torch.ops.pyllm.attention_ext_fwd
    q = torch.randn(1, 9, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 11, 1, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 11, 1, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(1, 2, 9, 1, device=DEVICE, requires_grad=True)
    slopes = torch.tensor([0.1, 0.3], device=DEVICE)
    for args in ((q, k, v, None, True, 0.25, 3, -1, 2.0, slopes, bias, 0.2, 123, 7, 9, 11),
                 (q, k, v, None, False, 0.25, 2, 4, 0.0, None, None, 0.0, 0, 0, 9, 11)):
        torch.library.opcheck(op, args)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, b):
        return pyllm.attention(q, k, v, causal=True, window_size=(3, -1), softcap=2.0, alibi_slopes=slopes,
                               attn_bias=b, backend=backend).sum()

    f(q, k, v, bias).backward()
    got = (q.grad.clone(), bias.grad.clone())
    ref = reference.attention(q, k, v, causal=True, window_size=(3, -1), softcap=2.0, alibi_slopes=slopes,
                              attn_bias=bias).sum()
    gq, gb = torch.autograd.grad(ref, (q, bias))
    torch.testing.assert_close(got[0], gq, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], gb, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cpu", reason="sets the interpreter's tile sizes (GPU runs autotune theirs)")
def test_triton_window_skips_blocks_with_small_tiles(monkeypatch):
    """16-wide tiles under the interpreter: many key/query blocks, so the window's block skipping (fwd, dK/dV
    and dQ loops) is exercised, with causal, dropout and Nq != Nk."""
    need("triton")
    from pyllm.kernels import attention as K

    monkeypatch.setattr(K, "_INTERPRET_BLOCK_M", 16)
    monkeypatch.setattr(K, "_INTERPRET_BLOCK_N", 16)
    for seed, (causal, window) in enumerate([(True, (9, -1)), (False, (5, 12))]):
        assert_rows(attention_case("triton", torch.float32, 1, 61, 75, 2, 1, 16, causal=causal, device=DEVICE,
                                   seed=seed, window_size=window, dropout_p=0.1))


# ---------------------------------------------------------------- packed sequences in one call
def _varlen_op(backend):
    ops = torch.ops.pyllm
    return (ops.triton_attention_varlen_fwd, ops.triton_attention_varlen_bwd) if backend == "triton" else \
        (ops.attention_varlen_fwd, ops.attention_varlen_bwd)


@pytest.mark.parametrize("backend", [b for b in serving("varlen") if b not in ("reference", "cuda")])
def test_varlen_one_call_many_blocks(backend, monkeypatch):
    """Lengths spanning several query/key blocks, empty sequences, Nq != Nk, GQA, causal + window + dropout +
    per-sequence ALiBi: the single packed call against the reference under the accuracy rule."""
    need(backend)
    if backend == "triton" and DEVICE == "cpu":  # 16-wide tiles: many blocks at small sizes in the interpreter
        from pyllm.kernels import attention as K

        monkeypatch.setattr(K, "_INTERPRET_BLOCK_M", 16)
        monkeypatch.setattr(K, "_INTERPRET_BLOCK_N", 16)
        lens_q, lens_k = [21, 0, 5, 34], [37, 7, 0, 34]
    else:
        lens_q, lens_k = [131, 0, 7, 150, 1], [129, 5, 0, 140, 70]
    slopes = torch.rand(len(lens_q), 4, device=DEVICE)
    cases = [(True, dict(dropout_p=0.15, alibi_slopes=slopes)), (False, dict(window_size=(9, 20), softcap=3.0))]
    for seed, (causal, kw) in enumerate(cases[:1] if backend == "triton" and DEVICE == "cpu" else cases):
        assert_rows(varlen_case(backend, torch.float32, lens_q, lens_k, 4, 2, 24, causal=causal, device=DEVICE,
                                seed=seed, **kw))


def test_cpu_varlen_backward_split_over_query_blocks():
    """Few (sequence, kv head) units: the cpu backward splits each over query blocks, each split with its own
    dK/dV accumulator in the packed layout, summed in order (deterministic mode fixes the split count)."""
    need("cpu")
    torch.use_deterministic_algorithms(True)  # 2 units, 3 query blocks: 3 splits
    try:
        for dtype in (torch.float32, torch.bfloat16):
            assert_rows(varlen_case("cpu", dtype, [260, 3], [140, 9], 2, 1, 16, causal=True, device=DEVICE,
                                    seed=3))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", [b for b in serving("varlen") if b not in ("reference", "cuda")])
def test_varlen_op_opcheck_compile_and_bad_offsets(backend):
    need(backend)
    fwd, _ = _varlen_op(backend)
    cu_q = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32, device=DEVICE)
    q = torch.randn(9, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(11, 1, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(11, 1, 16, device=DEVICE, requires_grad=True)
    slopes = torch.tensor([0.1, 0.3], device=DEVICE)
    for args in ((q, k, v, cu_q, cu_k, 6, 5, True, 0.25, 3, -1, 2.0, slopes, 0.2, 123, 7),
                 (q, k, v, cu_q, cu_k, 6, 5, False, 0.25, 2, 4, 0.0, None, 0.0, 0, 0)):
        torch.library.opcheck(fwd, args)
    # the dropout wrapper that reads the seed tensor when it runs, packed and padded
    kernel, rng = ("triton" if backend == "triton" else "native"), torch.tensor([123, 7])
    torch.library.opcheck(torch.ops.pyllm.attention_dropout_fwd,
                          (kernel, q, k, v, None, cu_q, cu_k, True, 0.25, 3, -1, 2.0, slopes, None, 0.2, rng, 6, 5))
    qb, kb = q.detach()[None, :6].requires_grad_(), k.detach()[None, :7].requires_grad_()
    torch.library.opcheck(torch.ops.pyllm.attention_dropout_fwd,
                          (kernel, qb, kb, kb, None, None, None, False, 0.25, -1, -1, 0.0, None,
                           torch.randn(1, 2, 6, 7, device=DEVICE, requires_grad=True), 0.2, rng, 6, 7))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return pyllm.attention_varlen(q, k, v, cu_q, cu_k, 6, 5, causal=True, window_size=(3, -1), softcap=2.0,
                                      alibi_slopes=slopes, backend=backend).sum()

    f(q, k, v).backward()
    got = q.grad.clone()
    q.grad = None
    pyllm.attention_varlen(q, k, v, cu_q, cu_k, 6, 5, causal=True, window_size=(3, -1), softcap=2.0,
                           alibi_slopes=slopes, backend="reference").sum().backward()
    torch.testing.assert_close(got, q.grad, atol=1e-4, rtol=1e-4)
    # the raw op guards its own reads: offsets past the tensor, decreasing, or longer than max_seqlen raise
    for bad in ([0, 3, 3, 10], [0, 5, 3, 9], [0, 3, 3, 9]):
        with pytest.raises((RuntimeError, ValueError), match="cu_seqlens"):
            fwd(q.detach(), k.detach(), v.detach(), torch.tensor(bad, dtype=torch.int32, device=DEVICE), cu_k,
                6 if bad != [0, 3, 3, 9] else 5, 5, False, 0.25, -1, -1, 0.0, None, 0.0, 0, 0)


def test_dropout_under_fullgraph_compile_default_backend():
    """The seed is drawn with torch ops and read by the kernel op when it runs, so torch.compile(fullgraph=True)
    with the default backend (inductor) and the default backend choice traces a dropout call; torch.manual_seed
    reproduces it, and with inductor's fallback_random (eager's generator) it equals the eager result."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)

    def f(q, k, v, qp, kp, vp):
        o = pyllm.attention(q, k, v, causal=True, dropout_p=0.3)
        op = pyllm.attention_varlen(qp, kp, vp, cu, cu, 13, 13, dropout_p=0.3)
        return o, op

    def inputs(grad=True):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(*s, generator=g).to(DEVICE).requires_grad_(grad) for s in [(1, 21, 2, 16)] * 3 +
                [(20, 2, 16)] * 3]

    compiled = torch.compile(f, fullgraph=True)
    x = inputs(grad=False)  # inductor's own generator: reproducible under torch.manual_seed
    torch.manual_seed(4)
    a = compiled(*x)
    torch.manual_seed(4)
    b = compiled(*x)
    c = compiled(*x)
    assert all(torch.equal(s, t) for s, t in zip(a, b)) and not torch.equal(a[0], c[0])
    with torch._inductor.config.patch(fallback_random=True):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)
        xc, xe = inputs(), inputs()
        torch.manual_seed(9)
        got = compiled(*xc)
        torch.manual_seed(9)
        want = f(*xe)
        for s, t in zip(got, want):
            torch.testing.assert_close(s, t)
        sum(o.sum() for o in got).backward()
        sum(o.sum() for o in want).backward()
        for s, t in zip(xc, xe):
            torch.testing.assert_close(s.grad, t.grad)


def test_varlen_per_sequence_fallback(monkeypatch):
    """A C++ backend without an attention_varlen_fwd kernel for the device (the cuda kernels) runs one
    attention_ext call per sequence, in the same dropout index space: checked here by hiding the CPU kernel."""
    need("cpu")
    from pyllm import _ext

    monkeypatch.setitem(_ext._HAS, ("attention_varlen", "CPU"), False)
    for seed, (lq, lk, Hq, Hkv, D, causal, kw) in enumerate(VARLEN_CASES):
        assert_rows(varlen_case("cpu", torch.float32, lq, lk, Hq, Hkv, D, causal=causal, device=DEVICE, seed=seed,
                                **kw))


def _poison(*shapes):
    """Allocate and free NaN tensors of these shapes, so the next allocations of their sizes likely reuse that
    memory: a kernel that leaves a row unwritten then returns NaN there, not a lucky zero from a fresh page."""
    for shape in shapes:
        t = torch.full(shape, float("nan"))
        del t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_backward_writes_every_gradient_row(dtype):
    """The cpu backward allocates dq, dk, dv without zero-filling them first: query rows that see no key (an
    empty key sequence, causal blocks before the first key), and keys of a sequence without queries, must still
    come back as exact zeros; every other row matches the reference."""
    need("cpu")
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    # packed: (Nq, Nk) = (0, 4), (5, 0), (4, 6); head_dim 64 (fp32 accumulates dK/dV in the outputs themselves)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in ([0, 0, 5, 9], [0, 4, 4, 10]))
    q, k, v = rnd(9, 4, 64), rnd(10, 2, 64), rnd(10, 2, 64)
    do = rnd(9, 4, 64)
    for causal in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        _poison(q.shape, k.shape, k.shape)
        out = pyllm.attention_varlen(*leaves, cu_q, cu_k, 5, 6, causal=causal, backend="cpu")
        dq, dk, dv = torch.autograd.grad(out, leaves, do)
        assert torch.isfinite(torch.cat([dq.flatten(), dk.flatten(), dv.flatten()])).all()
        assert not dq[:5].any() and not dk[:4].any() and not dv[:4].any()
        ref = [t.detach().double().requires_grad_() for t in (q[5:], k[4:], v[4:])]
        want = torch.autograd.grad(reference.attention(*(t[None] for t in ref), causal=causal), ref,
                                   do[5:].double()[None])
        for got, w in zip((dq[5:], dk[4:], dv[4:]), want):
            torch.testing.assert_close(got.double(), w, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
    # padded, causal with Nq > Nk (bottom-right): the first query blocks see no key and are skipped
    q, k, v, do = rnd(2, 150, 4, 64), rnd(2, 9, 2, 64), rnd(2, 9, 2, 64), rnd(2, 150, 4, 64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _poison(q.shape, k.shape, k.shape)
    got = torch.autograd.grad(pyllm.attention(*leaves, causal=True, backend="cpu"), leaves, do)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference.attention(*ref, causal=True), ref, do.double())
    assert not want[0][:, :141].any() and not got[0][:, :141].any()  # rows 0..140 see no key
    for gt, w in zip(got, want):
        assert torch.isfinite(gt).all()
        torch.testing.assert_close(gt.double(), w, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
