"""Issue 15 item 1: the CPU flash-decoding kernel (csrc/cpu/attention_decode.cpp), an internal op
``pyllm::attention_decode_fwd`` with attention_fwd's schema, held to the one accuracy rule
(pyllm.accuracy): its error against an fp64 (fp32 for bf16/fp16) reference at most 2x PyTorch's own
error in the input precision (+1e-5), for the output and the log-sum-exp, over odd sizes."""
import pytest
import torch

from pyllm import _ext, accuracy, reference

pytestmark = pytest.mark.skipif(_ext.load_error() is not None or not hasattr(torch.ops.pyllm, "attention_decode_fwd"),
                                reason="pyllm._C without the decode kernel")

# (B, Nq, Nk, Hq, Hkv, D): one decode step, GQA, a few queries, head dims that are not a vector multiple
GRID = [(1, 1, 129, 12, 12, 64), (2, 1, 77, 4, 2, 40), (3, 2, 200, 6, 3, 17), (2, 3, 65, 2, 1, 8),
        (2, 1, 1031, 2, 2, 64)]


def _ref(q, k, v, mask, causal, upcast):
    return reference.attention(q, k, v, causal=causal, key_padding_mask=mask, upcast=upcast, return_lse=True)


@pytest.mark.parametrize("dims", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, padded", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_matches_reference_under_the_accuracy_rule(dims, dtype, causal, padded, threads):
    B, Nq, Nk, Hq, Hkv, D = dims
    inp = accuracy.attention_inputs(B, Nq, Nk, Hq, Hkv, D, dtype=dtype, padded=padded, min_keys=1, seed=Nk)
    q, k, v, mask = inp["q"], inp["k"], inp["v"], inp["mask"]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # the key split depends on the thread count
    try:
        out, lse = torch.ops.pyllm.attention_decode_fwd(q, k, v, mask, causal, D ** -0.5)
    finally:
        torch.set_num_threads(saved)
    rd = accuracy.reference_dtype(dtype)
    ref = _ref(q.to(rd), k.to(rd), v.to(rd), mask, causal, upcast=False)
    base = _ref(q, k, v, mask, causal, upcast=False)  # PyTorch's math in the input precision
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, Hq, Nq) and lse.dtype == torch.float32
    for name, err, allowed in accuracy.compare(["out", "lse"], [out, lse], ref, base):
        assert accuracy.passes(err, allowed), f"{name}: error {err:.3g} > allowed {allowed:.3g}"


def test_rows_without_keys_give_zero_and_minus_inf():
    B, Nq, Nk, H, D = 3, 1, 9, 2, 16
    inp = accuracy.attention_inputs(B, Nq, Nk, H, H, D, padded=True, min_keys=0)
    mask = inp["mask"].clone()
    mask[2] = False  # row 2 sees no key at all
    out, lse = torch.ops.pyllm.attention_decode_fwd(inp["q"], inp["k"], inp["v"], mask, False, 0.25)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))
    ref_o, ref_lse = reference.attention(inp["q"].double(), inp["k"].double(), inp["v"].double(), softmax_scale=0.25,
                                         key_padding_mask=mask, return_lse=True)
    torch.testing.assert_close(out[:2].double(), ref_o[:2], atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_argument():
    q, k = torch.randn(1, 1, 2, 64), torch.randn(1, 8, 2, 32)
    with pytest.raises(RuntimeError, match="k has head_dim 32 but q has 64"):
        torch.ops.pyllm.attention_decode_fwd(q, k, k, None, False, 0.125)
