"""The drop-ins: pyllm.scaled_dot_product_attention vs torch's over its whole signature, and
pyllm.nn.MultiheadAttention vs torch.nn.MultiheadAttention with the same weights."""
import pytest
import torch
import torch.nn.functional as F

import pyllm
from tests.conftest import DEVICE, KERNEL_BACKENDS, need

B, H, L, S, E = 2, 4, 11, 13, 32


def _qkv(L=L, S=S, Hkv=H, dtype=torch.float32, grad=False):
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype, requires_grad=grad)  # noqa: E731
    return mk(B, H, L, E), mk(B, Hkv, S, E), mk(B, Hkv, S, E)


def _kpm(S=S):
    m = torch.ones(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    m[1, ..., -4:] = False
    return m


CASES = {
    "plain": dict(),
    "causal_square": dict(is_causal=True, L=S),
    "causal_top_left_L_ne_S": dict(is_causal=True),
    "bool_key_padding": dict(attn_mask="kpm"),
    "bool_full_mask": dict(attn_mask="full"),
    "float_mask": dict(attn_mask="float"),
    "scale": dict(scale=0.3),
    "gqa": dict(enable_gqa=True, Hkv=2),
}


@pytest.mark.parametrize("backend", ["auto", "reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_matches_torch(backend, name):
    if backend not in ("auto", "reference"):
        need(backend)
    c = dict(CASES[name])
    Lq = c.pop("L", L)
    q, k, v = _qkv(L=Lq, Hkv=c.pop("Hkv", H), grad=True)
    mask = c.pop("attn_mask", None)
    if mask == "kpm":
        mask = _kpm()
    elif mask == "full":
        mask = torch.rand(Lq, S, device=DEVICE) > 0.3
        mask[:, 0] = True  # torch gives NaN for rows with no key; keep every row alive
    elif mask == "float":
        mask = torch.randn(B, 1, Lq, S, device=DEVICE)
    kernel_can = name in ("plain", "causal_square", "bool_key_padding", "scale", "gqa")
    if name in ("bool_full_mask", "float_mask") and backend in KERNEL_BACKENDS:  # masks map to attn_bias
        kernel_can = "attn_bias" in pyllm.capabilities.TABLES[backend].attention_features
    if backend in KERNEL_BACKENDS:  # these float32 inputs: the cuda kernel takes fp16/bf16 only, and says so
        caps = pyllm.capabilities.TABLES[backend]
        kernel_can = kernel_can and "float32" in caps.op_dtypes.get("attention", caps.dtypes)
    if backend in KERNEL_BACKENDS and not kernel_can:
        with pytest.raises(ValueError, match="cannot serve"):
            pyllm.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, **c)
        return
    out = pyllm.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, **c)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **c)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (q, k, v), g)
    theirs = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sdpa_3d_different_value_dim_and_dropout():
    q, k = torch.randn(H, L, E), torch.randn(H, S, E)
    v = torch.randn(H, S, 48)  # Ev != E
    torch.testing.assert_close(pyllm.scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    q4, k4, v4 = _qkv()
    assert pyllm.scaled_dot_product_attention(q4, k4, v4, dropout_p=1.0).abs().max() == 0
    torch.manual_seed(1)
    out = pyllm.scaled_dot_product_attention(q4, k4, v4, dropout_p=0.5)
    assert out.shape == (B, H, L, E) and torch.isfinite(out).all()


def test_sdpa_explain_and_errors():
    need(KERNEL_BACKENDS[0])
    q, k, v = _qkv()
    r = pyllm.backends.explain("scaled_dot_product_attention", q, k, v, attn_mask=torch.randn(L, S, device=DEVICE))
    if "attn_bias" not in pyllm.capabilities.TABLES[KERNEL_BACKENDS[0]].attention_features:  # masks map to attn_bias
        assert r["reference"] == [] and any("attn_bias" in x for x in r[KERNEL_BACKENDS[0]])
    with pytest.raises(ValueError, match="enable_gqa"):
        pyllm.scaled_dot_product_attention(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        pyllm.scaled_dot_product_attention(q, k, v, attn_mask=_kpm(), is_causal=True)
    with pytest.raises(ValueError, match="key has embedding dim 8 but query has 32"):
        pyllm.scaled_dot_product_attention(q, k[..., :8], v)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("variant", ["self", "kpm", "causal", "kdim", "need_weights", "unbatched", "bias_kv"])
def test_multihead_attention_matches_torch(batch_first, variant):
    torch.manual_seed(0)
    kw = dict(kdim=20, vdim=24) if variant == "kdim" else {}
    if variant == "bias_kv":
        kw["add_bias_kv"] = True
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw).eval()
    ours = pyllm.nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    Lq, Nb = 9, 3
    shape = lambda n, d: (Nb, n, d) if batch_first else (n, Nb, d)  # noqa: E731
    x = torch.randn(shape(Lq, 32), requires_grad=True)
    key = torch.randn(shape(Lq, kw.get("kdim", 32)))
    val = torch.randn(shape(Lq, kw.get("vdim", 32)))
    args = dict(need_weights=variant == "need_weights")
    if variant == "kpm":
        kpm = torch.zeros(Nb, Lq, dtype=torch.bool)
        kpm[1, -3:] = True  # torch's convention: True = ignore
        args["key_padding_mask"] = kpm
    if variant == "causal":
        args["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(Lq)
        args["is_causal"] = True
    if variant == "unbatched":
        x, key, val = x[0].detach().requires_grad_(), key[0], val[0]
    if variant in ("self", "kpm", "causal", "unbatched", "bias_kv"):
        key, val = x, x
    o_ref, w_ref = ref(x, key, val, **args)
    o, w = ours(x, key, val, **args)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    if variant == "need_weights":
        torch.testing.assert_close(w, w_ref)
    g1 = torch.autograd.grad(o.sum(), x)[0]
    g2 = torch.autograd.grad(o_ref.sum(), x)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_replace_modules_swaps_multihead_attention():
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 7, 32)
    before = layer(x)
    pyllm.nn.replace_modules(layer)
    assert isinstance(layer.self_attn, pyllm.nn.MultiheadAttention)
    assert isinstance(layer.norm1, pyllm.nn.LayerNorm)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
