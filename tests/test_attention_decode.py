"""The CPU flash-decoding path (csrc/cpu/attention_decode.cpp, issue 15): few query rows, many keys.

attention_fwd on the cpu backend takes it for Nq <= 8 (fp16/bf16: Nq <= 4, or <= 8 from Nk 128) with
(Hq / Hkv) Nq <= 32 on an AVX-512 CPU; the
accuracy rule (pyllm.accuracy, through pyllm.check) holds for out and for the gradients, which the backward
computes from the decode path's lse: odd Nk, GQA/MQA, fp32/bf16/fp16, padding (rows with no key), causal
with Nq > 1, head dims with a masked tail, and key splits combined by log-sum-exp (2 threads, one kv head).
"""
import sys

import pytest
import torch

from pyllm.check import attention_case
from tests.conftest import DEVICE, need

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the CPU kernel")

# (B, Nq, Nk, Hq, Hkv, D, causal, padded)
CASES = [
    (1, 1, 1, 2, 2, 64, False, False),
    (2, 1, 17, 4, 2, 64, False, True),      # padding: batch row 1 keeps 8 of 17 keys
    (2, 1, 113, 4, 1, 40, True, True),      # MQA, a head dim with a masked tail
    (1, 3, 113, 6, 2, 64, True, False),     # causal with Nq > 1 (bottom-right)
    (3, 2, 57, 2, 2, 16, True, True),       # a row may see no key: zeros, lse -inf, no NaN
    (1, 1, 301, 2, 1, 128, False, False),   # several sub-chunks (online softmax across them)
    (1, 5, 77, 8, 2, 96, True, False),
    (1, 1, 33, 2, 2, 256, False, True),
    (1, 8, 16, 2, 2, 64, True, False),      # the largest Nq it takes
    (1, 16, 16, 2, 2, 64, True, False),     # the small prefill call Nq = Nk = 16 (the blocked kernel's since)
]


def _ids(c):
    B, Nq, Nk, Hq, Hkv, D, causal, padded = c
    return f"B{B}-Nq{Nq}-Nk{Nk}-H{Hq}/{Hkv}-D{D}" + ("-causal" if causal else "") + ("-pad" if padded else "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_decode_accuracy_rule(case, dtype):
    need("cpu")
    B, Nq, Nk, Hq, Hkv, D, causal, padded = case
    rows = attention_case("cpu", dtype, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded)
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n".join(f"{r.dtype} {r.shape} {r.tensor}: {r.error:.3e} > {r.allowed:.3e}" for r in bad)


# With 2 threads, (B, Nq, Nk, Hq, Hkv, D): how attention_decode.cpp divides the work among them.
THREADED = [
    (2, 1, 1031, 4, 1, 64),    # one task per thread (a batch row each)
    (1, 1, 1031, 4, 1, 64),    # one task: the keys are split in two, combined by log-sum-exp
    (1, 1, 1031, 6, 3, 64),    # 3 kv heads in one group: key splits again
    (1, 1, 301, 12, 12, 64),   # few keys: two head groups of 6 instead (no combine)
    (1, 1, 301, 6, 3, 40),     # few keys, 3 kv heads: groups of 2 and 1
    (1, 1, 200, 1, 1, 64),     # few keys, one head: key splits of at least 32 keys
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_work_split_two_threads(dtype):
    """2 threads: key splits (partial softmaxes combined by log-sum-exp) and head groups, each against the
    accuracy rule, causal with padding too."""
    need("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for B, Nq, Nk, Hq, Hkv, D in THREADED:
            for causal, padded in ((False, False), (True, True)):
                rows = attention_case("cpu", dtype, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded)
                bad = [r for r in rows if not r.ok]
                assert not bad, "\n".join(f"{r.shape} {r.tensor}: {r.error:.3e} > {r.allowed:.3e}" for r in bad)
    finally:
        torch.set_num_threads(threads)


def test_decode_lse_and_empty_rows():
    """lse is log-sum-exp of the visible scaled scores; a row that sees no key gives out = 0, lse = -inf."""
    need("cpu")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 4, 64), torch.randn(2, 70, 2, 64), torch.randn(2, 70, 2, 64)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[1] = False
    o, lse = torch.ops.pyllm.attention_fwd(q, k, v, mask, False, 0.125)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * 0.125
    torch.testing.assert_close(lse[0].double(), torch.logsumexp(s[0], -1), rtol=1e-6, atol=1e-6)
    assert torch.all(o[1] == 0) and torch.all(lse[1] == float("-inf"))


_AVX512 = sys.platform == "linux" and "avx512f" in open("/proc/cpuinfo").read()


@pytest.mark.skipif(not _AVX512, reason="the decode kernel needs AVX-512; elsewhere the blocked kernel serves")
def test_decode_path_is_taken(monkeypatch):
    """On an AVX-512 CPU the decode kernel serves Nq = 1 (its sums run in another order than the blocked
    kernel's, which PYLLM_CPU_DECODE=0 forces): the two differ in the last bits and agree otherwise."""
    need("cpu")
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 64), torch.randn(1, 113, 4, 64), torch.randn(1, 113, 4, 64)
    on = torch.ops.pyllm.attention_fwd(q, k, v, None, False, 0.125)
    monkeypatch.setenv("PYLLM_CPU_DECODE", "0")
    off = torch.ops.pyllm.attention_fwd(q, k, v, None, False, 0.125)
    assert not all(torch.equal(a, b) for a, b in zip(on, off))
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_strided_views(dtype):
    """K/V as views of (B, H, N, D) tensors (SDPA's layout, heads not interleaved with keys) and a padded q:
    the same kernel walks the strides and gives exactly the result of contiguous copies."""
    need("cpu")
    torch.manual_seed(0)
    for B, Nk, Hq, Hkv in ((1, 1031, 12, 12), (3, 300, 8, 2)):
        q = torch.randn(B, 1, Hq, 80, dtype=dtype)[..., :64]
        k, v = (torch.randn(B, Hkv, Nk, 64, dtype=dtype).transpose(1, 2) for _ in range(2))
        mask = torch.rand(B, Nk) > 0.3
        strided = torch.ops.pyllm.attention_fwd(q, k, v, mask, True, 0.125)
        dense = torch.ops.pyllm.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), mask, True, 0.125)
        for a, b in zip(strided, dense):
            assert torch.equal(a, b)


def test_packed_kv_buffers_kept_between_calls():
    """The blocked kernel packs fp16/bf16 K/V into fp32 buffers that each thread keeps for its next call
    (csrc/cpu/attention.cpp pack_buffer): a smaller call after a larger one, another input dtype, a padded one
    and a larger one again each match the reference (stale rows or padding from the previous call would not)."""
    need("cpu")
    import pyllm

    torch.manual_seed(0)
    seq = [(torch.bfloat16, 1, 300, 300, 40, False), (torch.float16, 2, 37, 53, 64, True),
           (torch.bfloat16, 1, 19, 100, 24, False), (torch.float64, 1, 33, 70, 16, True),
           (torch.bfloat16, 2, 301, 410, 40, True)]
    for dtype, B, Nq, Nk, D, padded in seq:
        q = torch.randn(B, Nq, 4, D, dtype=dtype)
        k, v = (torch.randn(B, Nk, 2, D, dtype=dtype) for _ in range(2))
        mask = None
        if padded:
            mask = torch.ones(B, Nk, dtype=torch.bool)
            mask[-1, Nk // 2:] = False
        out = pyllm.attention(q, k, v, key_padding_mask=mask, backend="cpu").double()
        ref = pyllm.attention(q.double(), k.double(), v.double(), key_padding_mask=mask, backend="reference")
        tol = 1e-9 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
