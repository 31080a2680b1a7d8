"""FlashAttention's features, benchmarked side by side: dropout, packed sequences, sliding window, additive bias.

Each comparison times forward+backward of every provider that runs here, interleaved (``time_interleaved``),
after checking it: pyllm against ``pyllm.reference`` in fp64 under the accuracy rule's tolerance, torch's
SDPA and FlexAttention against the same reference where their semantics match exactly (SDPA's dropout draws
its own mask, so it is checked without dropout and then timed with it). Ratios are of medians.

    dropout   dropout 0.1, fwd+bwd: pyllm vs SDPA with dropout (on the CPU: its math path, O(N^2) memory)
    packed    16 sequences of lengths drawn from 64..2048, causal: attention_varlen vs the padded batch
              (pyllm with a key-padding mask, SDPA with a bool mask)
    window    window 256 causal at N=8192 vs full causal at N=512: time per query (linear in N when ~1x)
    bias      attn_bias (1, H, N, N) with its gradient vs SDPA with the same float mask
Also the peak extra memory of one fwd+bwd for the dropout case (this process, CPU resident set or CUDA).
With ``flex``, torch's FlexAttention (compiled) joins as a peer wherever it expresses the case: a document
block mask over the packed batch, a sliding-window block mask, the bias as a score_mod (it has no dropout).
On the CPU this torch's FlexAttention has no backward, so there both sides are timed forward only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .measure import rss_peak_of, summarize, time_interleaved

FULL = dict(dropout=(1, 8, 4096, 64), packed=(16, 64, 8, 2048), window=(1, 8, 8192, 512, 64, 256),
            bias=(2, 8, 1024, 64))
QUICK = dict(dropout=(1, 2, 256, 32), packed=(16, 32, 2, 256), window=(1, 2, 1024, 128, 32, 64),
             bias=(1, 2, 128, 32))


def _fwd_bwd(fn, leaves):
    def run():
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _close(a, b, what):
    err = (a.double() - b.double()).abs().max().item()
    if not err <= 1e-3:
        raise AssertionError(f"{what}: max error {err:.2e} against pyllm.reference")
    return err


def _flex():
    """A compiled flex_attention, or None when this torch has none / cannot compile it here."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def dropout_case(dims, device, dtype, backend, flex=False):
    import pyllm

    B, H, N, D = dims
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(device, dtype) for _ in range(3))
    torch.manual_seed(1)
    o = pyllm.attention(q, k, v, dropout_p=0.1, backend=backend)
    torch.manual_seed(1)
    ref = pyllm.reference.attention(*(t.double() for t in (q, k, v)), dropout_p=0.1)
    checks = {"pyllm": _close(o, ref, "pyllm dropout")}
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    checks["sdpa (p=0)"] = _close(F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2),
                                  pyllm.reference.attention(*(t.double() for t in (q, k, v))), "sdpa")
    lp, ls = _leaves(q, k, v), _leaves(qt, kt, vt)
    fns = {f"pyllm-{backend}": _fwd_bwd(lambda: pyllm.attention(*lp, dropout_p=0.1, backend=backend), lp),
           "sdpa": _fwd_bwd(lambda: F.scaled_dot_product_attention(*ls, dropout_p=0.1), ls)}
    return fns, checks, f"B{B} H{H} N{N} D{D} dropout 0.1"


def packed_case(dims, device, dtype, backend, flex=False):
    import pyllm

    nseq, lo, H, hi = dims[0], dims[1], dims[2], dims[3]
    D = 64 if hi >= 1024 else 32
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (nseq,), generator=g).tolist()
    total, N = sum(lens), max(lens)
    q, k, v = (torch.randn(total, H, D, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    valid = (torch.arange(N)[None, :] < torch.tensor(lens)[:, None]).to(device)

    def pad(t):
        out = t.new_zeros(nseq, N, H, D)
        out[valid] = t
        return out

    qp, kp, vp = pad(q), pad(k), pad(v)
    o = pyllm.attention_varlen(q, k, v, cu, cu, N, N, causal=True, backend=backend)
    o_pad = pyllm.attention(qp, kp, vp, causal=True, key_padding_mask=valid, backend=backend)
    ref = pyllm.reference.attention_varlen(*(t.double() for t in (q, k, v)), cu, cu, N, N, causal=True)
    sd_mask = valid[:, None, None, :] & torch.ones(N, N, dtype=torch.bool, device=device).tril()
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (qp, kp, vp))
    o_sd = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=sd_mask).transpose(1, 2)
    checks = {"varlen": _close(o, ref, "varlen"), "padded": _close(o_pad[valid], ref, "padded"),
              "sdpa padded": _close(o_sd[valid], ref, "sdpa padded")}
    lv, lp, ls = _leaves(q, k, v), _leaves(qp, kp, vp), _leaves(qt, kt, vt)
    fns = {f"pyllm-{backend} varlen": _fwd_bwd(
               lambda: pyllm.attention_varlen(*lv, cu, cu, N, N, causal=True, backend=backend), lv),
           f"pyllm-{backend} padded": _fwd_bwd(
               lambda: pyllm.attention(*lp, causal=True, key_padding_mask=valid, backend=backend), lp),
           "sdpa padded": _fwd_bwd(lambda: F.scaled_dot_product_attention(*ls, attn_mask=sd_mask), ls)}
    if flex and (fx := _flex()) is not None:  # one packed row, a document-causal block mask
        flex_attention, create_block_mask = fx
        doc = torch.repeat_interleave(torch.arange(nseq, device=device), torch.tensor(lens, device=device))
        bm = create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i), None, None, total, total,
                               device=device)
        lf = _leaves(*(t[None].transpose(1, 2).contiguous() for t in (q, k, v)))
        lf = [t.detach() for t in lf] if device == "cpu" else lf  # no FlexAttention backward on the CPU
        checks["flex packed"] = _close(flex_attention(*(t.detach() for t in lf), block_mask=bm)[0].transpose(0, 1),
                                       ref, "flex packed")
        _add_flex(fns, f"pyllm-{backend} varlen", lambda: pyllm.attention_varlen(q, k, v, cu, cu, N, N, causal=True,
                                                                                backend=backend),
                  "flex packed", lambda: flex_attention(*lf, block_mask=bm), lf, device)
    return fns, checks, f"{nseq} seqs {lo}..{hi} (total {total}, longest {N}) H{H} D{D} causal"


def window_case(dims, device, dtype, backend, flex=False):
    import pyllm

    B, H, N, N0, D, w = dims
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(device, dtype) for _ in range(3))
    small = [t[:, :N0] for t in (q, k, v)]
    checks = {"window": _close(pyllm.attention(q[:, -300:], k, v, causal=True, window_size=(w, -1),
                                               backend=backend),
                               pyllm.reference.attention(*(t.double() for t in (q[:, -300:], k, v)), causal=True,
                                                         window_size=(w, -1)), "window")}
    lw, l0 = _leaves(q, k, v), _leaves(*small)
    fns = {f"pyllm-{backend} N{N} window {w}": _fwd_bwd(
               lambda: pyllm.attention(*lw, causal=True, window_size=(w, -1), backend=backend), lw),
           f"pyllm-{backend} N{N0} causal": _fwd_bwd(lambda: pyllm.attention(*l0, causal=True, backend=backend), l0)}
    if flex and (fx := _flex()) is not None:
        flex_attention, create_block_mask = fx
        bm = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j <= w), None, None, N, N, device=device)
        lf = _leaves(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))
        if device == "cpu":  # torch 2.13's FlexAttention has no CPU backward: compare forwards
            lf = [t.detach() for t in lf]
        o = flex_attention(*lf, block_mask=bm).transpose(1, 2)
        checks["flex window"] = _close(o[:, -300:], pyllm.reference.attention(
            *(t.double() for t in (q, k, v)), causal=True, window_size=(w, -1))[:, -300:], "flex")
        if device == "cpu":
            fns[f"pyllm-{backend} N{N} window {w} fwd"] = lambda: pyllm.attention(
                q, k, v, causal=True, window_size=(w, -1), backend=backend)
            fns[f"flex N{N} window {w} fwd"] = lambda: flex_attention(*lf, block_mask=bm)
        else:
            fns[f"flex N{N} window {w}"] = _fwd_bwd(lambda: flex_attention(*lf, block_mask=bm), lf)
    return fns, checks, f"B{B} H{H} D{D} causal: N{N} window {w} vs N{N0}"


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _add_flex(fns, pyllm_name, pyllm_fwd, flex_name, flex_fn, leaves, device):
    """Add FlexAttention beside pyllm: fwd+bwd on a GPU; on the CPU (no FlexAttention backward in this torch)
    both forward only."""
    if device == "cpu":
        for name, fn in ((f"{pyllm_name} fwd", pyllm_fwd), (f"{flex_name} fwd", flex_fn)):
            fns[name] = lambda fn=fn: _no_grad(fn)
    else:
        fns[flex_name] = _fwd_bwd(flex_fn, leaves)


def bias_case(dims, device, dtype, backend, flex=False):
    import pyllm

    B, H, N, D = dims
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(device, dtype) for _ in range(3))
    bias = torch.randn(1, H, N, N, generator=g).to(device, dtype)
    o = pyllm.attention(q, k, v, attn_bias=bias, backend=backend)
    ref = pyllm.reference.attention(*(t.double() for t in (q, k, v)), attn_bias=bias.double())
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    checks = {"pyllm": _close(o, ref, "pyllm bias"),
              "sdpa": _close(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias).transpose(1, 2), ref, "sdpa")}
    lp, ls = _leaves(q, k, v, bias), _leaves(qt, kt, vt, bias)
    fns = {f"pyllm-{backend}": _fwd_bwd(lambda: pyllm.attention(*lp[:3], attn_bias=lp[3], backend=backend), lp),
           "sdpa float mask": _fwd_bwd(lambda: F.scaled_dot_product_attention(*ls[:3], attn_mask=ls[3]), ls)}
    if flex and (fx := _flex()) is not None:  # the bias as a score_mod (no gradient for it: q, k, v only)
        flex_attention, _ = fx
        bh = bias[0]
        lf = _leaves(qt, kt, vt)
        lf = [t.detach() for t in lf] if device == "cpu" else lf
        score_mod = lambda s, b, h, i, j: s + bh[h, i, j]  # noqa: E731
        checks["flex bias"] = _close(flex_attention(*(t.detach() for t in lf), score_mod=score_mod).transpose(1, 2),
                                     ref, "flex bias")
        _add_flex(fns, f"pyllm-{backend}", lambda: pyllm.attention(q, k, v, attn_bias=bias, backend=backend),
                  "flex score_mod", lambda: flex_attention(*lf, score_mod=score_mod), lf, device)
    return fns, checks, f"B{B} H{H} N{N} D{D} bias (1, H, N, N) with grad"


CASES = {"dropout": dropout_case, "packed": packed_case, "window": window_case, "bias": bias_case}


def run(device="cpu", quick=False, threads=None, which=None, flex=False, out=print) -> list[dict]:
    """Run the comparisons; returns one dict per comparison (label, checks, times, ratios, memory)."""
    threads = threads or torch.get_num_threads()
    backend = {"cpu": "cpu", "cuda": "triton"}[device]
    dims = QUICK if quick else FULL
    results = []
    for name in which or CASES:
        fns, checks, label = CASES[name](dims[name], device, torch.float32 if device == "cpu" else torch.bfloat16,
                                         backend, flex=flex)
        times = time_interleaved(fns, device, threads=threads, repeats=3 if quick else 7, warmup=1,
                                 min_run_s=0.0 if quick else 0.2, max_s=2.0 if quick else 20.0)
        med = {n: summarize(t)["median_ms"] for n, t in times.items()}
        first = next(iter(med))
        ratios = {n: med[n] / med[first] for n in med}  # > 1: slower than the first (pyllm)
        row = {"case": name, "label": label, "checks": checks, "median_ms": med, "time_vs_first": ratios}
        if name == "window":  # time per query, N vs N0
            N, N0 = dims[name][2], dims[name][3]
            names = list(med)
            row["per_query_ratio"] = (med[names[0]] / N) / (med[names[1]] / N0)
        if name == "dropout" and device == "cpu":
            row["peak_mib"] = {n: rss_peak_of(fn) / 2**20 for n, fn in fns.items()}
        results.append(row)
        out(f"\n{name}: {label}")
        out("  checked: " + ", ".join(f"{k} max err {v:.1e}" for k, v in checks.items()))
        for n in med:
            out(f"  {n:<36} {med[n]:10.2f} ms   {med[n] / med[first]:5.2f}x the time of {first}")
        if "per_query_ratio" in row:
            out(f"  time per query, long window / short full causal: {row['per_query_ratio']:.2f}")
        if "peak_mib" in row:
            peaks = ", ".join(f"{n} {m:.0f} MiB" for n, m in row["peak_mib"].items())
            out(f"  peak extra memory, one fwd+bwd: {peaks}")
    return results
