"""Issue 11, defects 8, 9 and 13: the op layer and the drop-ins on inputs torch accepts or that must give a
clear error. Each test is named after its defect."""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm import backends


def _sdpa_inputs(dtype=torch.float32, L=5, S=7):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, L, 16, generator=g).to(dtype)
    k = torch.randn(2, 4, S, 16, generator=g).to(dtype)
    v = torch.randn(2, 4, S, 16, generator=g).to(dtype)
    return q, k, v


def test_defect8_sdpa_fp32_float_mask_with_bf16_query():
    q, k, v = _sdpa_inputs(torch.bfloat16)
    mask = torch.randn(5, 7)  # fp32, as torch accepts with a bf16 query
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = pyllm.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"attn_mask": "bool"}, {"attn_mask": "float"}])
def test_defect8_sdpa_empty_key_returns_zeros_like_torch(kwargs):
    q, k, v = _sdpa_inputs(S=0)
    if kwargs.get("attn_mask") == "bool":
        kwargs = {"attn_mask": torch.ones(5, 0, dtype=torch.bool)}
    elif kwargs.get("attn_mask") == "float":
        kwargs = {"attn_mask": torch.zeros(5, 0)}
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = pyllm.scaled_dot_product_attention(q, k, v, **kwargs)
    assert got.shape == want.shape == (2, 4, 5, 16)
    assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5"])
def test_defect8_sdpa_scale_not_finite_is_a_clear_error(scale):
    q, k, v = _sdpa_inputs()
    with pytest.raises((ValueError, TypeError), match="scale"):
        pyllm.scaled_dot_product_attention(q, k, v, scale=scale)
    assert torch.allclose(pyllm.scaled_dot_product_attention(q, k, v, scale=0.5),
                          F.scaled_dot_product_attention(q, k, v, scale=0.5), atol=1e-5)


def test_defect9_head_dim_0_is_a_clear_error():
    q = torch.randn(1, 3, 2, 0)
    with pytest.raises(ValueError, match="head_dim") as e:
        pyllm.attention(q, q, q)
    assert "0" in str(e.value)
    with pytest.raises(ValueError, match="head_dim"):
        backends.explain("attention", q, q, q)


def test_defect9_meta_tensors_on_the_reference_path():
    meta = lambda *s: torch.randn(*s, device="meta")  # noqa: E731
    q, k, v = meta(2, 3, 4, 8), meta(2, 5, 2, 8), meta(2, 5, 2, 8)
    kpm = torch.ones(2, 5, dtype=torch.bool, device="meta")
    o, lse = pyllm.attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=True, backend="reference")
    assert o.shape == q.shape and o.device.type == "meta" and lse.shape == (2, 4, 3)
    o = pyllm.attention(q, k, v, key_padding_mask=kpm)  # auto on meta: the reference serves it
    assert o.shape == q.shape
    o = pyllm.scaled_dot_product_attention(meta(2, 4, 3, 8), meta(2, 4, 5, 8), meta(2, 4, 5, 8),
                                           attn_mask=meta(3, 5))
    assert o.shape == (2, 4, 3, 8)
    assert pyllm.layer_norm(meta(3, 8), (8,), meta(8), meta(8)).shape == (3, 8)
    assert pyllm.rms_norm(meta(3, 8), (8,), meta(8)).shape == (3, 8)


def test_defect9_list_as_key_padding_mask_is_a_clear_error():
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(TypeError) as e:
        pyllm.attention(q, q, q, key_padding_mask=[[True, True]])
    assert "key_padding_mask" in str(e.value) and "list" in str(e.value)


def _spy(monkeypatch, owner, name, calls):
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)


def test_defect13_swapped_transformer_encoder_runs_pyllm_in_eval_no_grad(monkeypatch):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 7, 32)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])  # torch's convention: True = padding
    with torch.no_grad():
        want, want_pad = model(x), model(x, src_key_padding_mask=pad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyllm.nn.replace_modules(model)
    assert any("fast path" in str(w.message) for w in caught), [str(w.message) for w in caught]
    calls = []
    # Every pyllm attention call runs _run or the C++ fast path; every norm call runs _kernel, _reference or the
    # C++ fast path (issue 15: repeated calls skip backends.select, the common CPU call is served in C++).
    attention_ops = importlib.import_module("pyllm.ops.attention")
    norm_ops = importlib.import_module("pyllm.ops.layer_norm")
    _spy(monkeypatch, attention_ops, "_run", calls)
    _spy(monkeypatch, norm_ops, "_kernel", calls)
    _spy(monkeypatch, norm_ops, "_reference", calls)
    for owner, label in ((attention_ops, "_run"), (norm_ops, "_kernel")):
        if owner._FAST is not None:
            def fast(*args, real=owner._FAST, label=label):
                out = real(*args)
                if out is not None:  # None: the call goes on to the full path (counted there)
                    calls.append(label)
                return out
            monkeypatch.setattr(owner, "_FAST", fast)
    _spy(monkeypatch, pyllm.nn.MultiheadAttention, "forward", calls)
    with torch.no_grad():
        got = model(x)
        norms = calls.count("_kernel") + calls.count("_reference")
        assert calls.count("_run") == 2 and norms == 4 and calls.count("forward") == 2, calls  # 2 attention, 4 norms
        calls.clear()
        got_pad = model(x, src_key_padding_mask=pad)
        assert calls.count("forward") == 2, calls  # pyllm's modules run (not torch's fused layer)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_pad[0], want_pad[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_pad[1, :5], want_pad[1, :5], atol=1e-4, rtol=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyllm.nn.replace_modules(model)  # nothing left to swap: no second warning
    assert not any("fast path" in str(w.message) for w in caught)
