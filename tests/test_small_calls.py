"""Issue 15 item 2: the norm op layer's small-call shortcuts change nothing but the cost.

The backend choice is cached per call description (and still follows ``backends.use`` and per-call
``backend=``); calls with nothing to differentiate skip the autograd wrapper and give the same values.
"""
import pytest
import torch

import pyllm
from pyllm import backends


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


def test_validated_metadata_skips_to_the_kernel():
    """A norm call whose metadata passed validation before goes straight to the kernel: same values, gradients
    still flow, the backend in force still decides, and bad arguments (new metadata) are still refused."""
    import importlib

    L = importlib.import_module("pyllm.ops.layer_norm")
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


def test_attention_validated_metadata_skips_the_checks():
    """attention without features: a call whose metadata was validated before skips the checks and the backend
    choice; values unchanged, gradients flow, use() still decides, and new (bad) metadata is still refused."""
    import importlib

    A = importlib.import_module("pyllm.ops.attention")
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
