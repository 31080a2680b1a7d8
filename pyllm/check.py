"""``pyllm check``: every available backend against the reference, under FlashAttention's accuracy rule.

The rule, its reference precision and the inputs are defined once, in :mod:`pyllm.accuracy`:

    max|fast - ref_hi| <= 2 * max|torch_same_dtype - ref_hi| + 1e-5

for the output and every gradient. The same functions (:func:`attention_case`, :func:`norm_case`,
:func:`rotary_case`) drive the test suite.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from pyllm import accuracy, backends, capabilities, ops, reference


@dataclasses.dataclass
class Row:
    op: str
    backend: str
    dtype: str
    shape: str
    tensor: str  # "out", "dq", "dx", ...
    error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return accuracy.passes(self.error, self.allowed)


def _grads(outputs, inputs, douts):
    return torch.autograd.grad(outputs, inputs, douts, allow_unused=True)


def _rows(op, backend, dtype, shape, names, fast, ref, base) -> list[Row]:
    dt = str(dtype).replace("torch.", "")
    return [Row(op, backend, dt, shape, name, err, allowed)
            for name, err, allowed in accuracy.compare(names, fast, ref, base)]


def attention_case(backend: str, dtype: torch.dtype, B: int, Nq: int, Nk: int, Hq: int, Hkv: int, D: int, *,
                   causal: bool = False, padded: bool = False, device="cpu", seed: int = 0) -> list[Row]:
    """Errors of ``pyllm.attention(backend=...)`` for out, dq, dk, dv on one random case."""
    inp = accuracy.attention_inputs(B, Nq, Nk, Hq, Hkv, D, dtype=dtype, device=device, padded=padded, seed=seed)
    q, k, v, do, mask = inp["q"], inp["k"], inp["v"], inp["dout"], inp["mask"]
    hi_dtype = accuracy.reference_dtype(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    hi = [t.detach().to(hi_dtype).requires_grad_() for t in (q, k, v)]
    lo = [t.detach().requires_grad_() for t in (q, k, v)]
    o = ops.attention(*leaves, causal=causal, key_padding_mask=mask, backend=backend)
    o_hi = reference.attention(*hi, causal=causal, key_padding_mask=mask, upcast=False)
    o_lo = reference.attention(*lo, causal=causal, key_padding_mask=mask, upcast=False)
    fast = [o, *_grads(o, leaves, do)]
    ref = [o_hi, *_grads(o_hi, hi, do.to(hi_dtype))]
    base = [o_lo, *_grads(o_lo, lo, do)]
    shape = f"B{B} Nq{Nq} Nk{Nk} H{Hq}/{Hkv} D{D}" + (" causal" if causal else "") + (" pad" if padded else "")
    return _rows("attention", backend, dtype, shape, ["out", "dq", "dk", "dv"], fast, ref, base)


def norm_case(op: str, backend: str, dtype: torch.dtype, M: int, N: int, *, residual: bool = False,
              affine: bool = True, device="cpu", seed: int = 0) -> list[Row]:
    """Errors of ``pyllm.layer_norm`` / ``pyllm.rms_norm`` (backend=...) for y (and h) and every gradient."""
    inp = accuracy.norm_inputs(op, M, N, dtype=dtype, device=device, residual=residual, affine=affine, seed=seed)
    x, r, w, b, dy, dh = (inp[n] for n in ("x", "r", "w", "b", "dy", "dh"))
    params = [t for t in (x, r, w, b) if t is not None]
    names = ["x", "residual", "weight", "bias"]
    names = [n for n, t in zip(names, (x, r, w, b)) if t is not None]

    def run(fn, tensors):
        d = dict(zip(names, tensors))
        args = (d["x"], (N,), d.get("weight"))
        args += (d.get("bias"), 1e-5) if op == "layer_norm" else (1e-6,)
        out = fn(*args, residual=d.get("residual"))
        y = out[0] if residual else out
        extra = [out[1]] if residual else []
        dys = [dy.to(y.dtype)] + [dh.to(y.dtype) for _ in extra]
        return [y, *extra, *_grads([y, *extra], tensors, dys)]

    leaves = [t.detach().requires_grad_() for t in params]
    hi = [t.detach().to(accuracy.reference_dtype(dtype)).requires_grad_() for t in params]
    lo = [t.detach().requires_grad_() for t in params]
    pyfn = getattr(ops, op)
    ref_fn = getattr(reference, op)
    torch_fn = _torch_norm(op)
    fast = run(lambda *a, **kw: pyfn(*a, **kw, backend=backend), leaves)
    ref = run(lambda *a, **kw: ref_fn(*a, **kw, upcast=False), hi)
    base = run(torch_fn, lo)
    outs = ["y", "h"] if residual else ["y"]
    shape = f"M{M} N{N}" + (" +res" if residual else "") + ("" if affine else " no-affine")
    return _rows(op, backend, dtype, shape, outs + ["d" + n for n in names], fast, ref, base)


def rotary_case(backend: str, dtype: torch.dtype, B: int, N: int, Hq: int, Hk: int, D: int, R: int | None = None,
                *, interleaved: bool = False, batch_tables: bool = False, device="cpu", seed: int = 0) -> list[Row]:
    """Errors of ``pyllm.rotary(backend=...)`` for q_out, k_out, dq, dk on one random case; rotary_dim R
    (default D); cos/sin per batch row when batch_tables, else shared (1, N, R/2). The baseline is the
    plain formula in the inputs' precision (cos/sin cast to it, as transformers' Llama does)."""
    R = D if R is None else R
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, dq, dk = mk(B, N, Hq, D), mk(B, N, Hk, D), mk(B, N, Hq, D), mk(B, N, Hk, D)
    pos = torch.arange(N, dtype=torch.float64)[None, :, None] + (
        torch.arange(B, dtype=torch.float64)[:, None, None] * 7 if batch_tables else 0)
    theta = pos * (10000.0 ** (-torch.arange(0, R, 2, dtype=torch.float64) / R))  # (1 or B, N, R/2)
    cos, sin = (t.to(device=device, dtype=torch.float32) for t in (theta.cos(), theta.sin()))

    def run(fn, tensors, tables):
        out = fn(*tensors, *tables, interleaved=interleaved)
        return [*out, *_grads(list(out), tensors, [dq.to(out[0].dtype), dk.to(out[1].dtype)])]

    hi_dtype = accuracy.reference_dtype(dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k)]
    hi = [t.detach().to(hi_dtype).requires_grad_() for t in (q, k)]
    lo = [t.detach().requires_grad_() for t in (q, k)]
    fast = run(lambda *a, **kw: ops.rotary(*a, **kw, backend=backend), leaves, (cos, sin))
    ref = run(lambda *a, **kw: reference.rotary(*a, **kw, upcast=False), hi, (cos.to(hi_dtype), sin.to(hi_dtype)))
    base = run(lambda *a, **kw: reference.rotary(*a, **kw, upcast=False), lo, (cos, sin))
    shape = (f"B{B} N{N} H{Hq}/{Hk} D{D}" + (f" R{R}" if R != D else "") + (" il" if interleaved else "")
             + (" perB" if batch_tables else ""))
    return _rows("rotary", backend, dtype, shape, ["q", "k", "dq", "dk"], fast, ref, base)


def _torch_norm(op):
    """PyTorch's own kernel in the input's precision (the baseline error of the rule)."""

    def fn(x, shape, weight=None, *rest, residual=None):
        h = x if residual is None else x + residual
        if op == "layer_norm":
            bias, eps = rest
            y = F.layer_norm(h, shape, weight, bias, eps)
        else:
            y = F.rms_norm(h, shape, weight, rest[0])
        return y if residual is None else (y, h)

    return fn


def _grid(device: str, full: bool):
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    norm = [(3, 1), (17, 127), (9, 1000), (5, 4097)] + ([(2, 65536)] if full else [])
    attn = [  # (B, Nq, Nk, Hq, Hkv, D, causal, padded)
        (1, 17, 17, 2, 2, 64, True, False),
        (2, 113, 97, 4, 2, 40, False, True),
        (1, 1, 113, 4, 1, 128, True, False),
        (2, 97, 113, 2, 1, 96, True, True),
    ]
    if full:
        attn += [(1, 1000, 1000, 2, 2, 64, True, False), (1, 33, 65, 1, 1, 256, False, True)]
    return dtypes, norm, attn


# rotary: (B, N, Hq, Hk, D, rotary_dim, interleaved, per-batch tables)
ROTARY_GRID = [(2, 17, 4, 2, 64, 64, False, False), (3, 13, 3, 1, 40, 24, True, True),
               (1, 97, 2, 2, 128, 128, False, True)]


def check(backends_: list[str] | None = None, *, device: str | None = None, full: bool = False,
          out=sys.stdout) -> bool:
    """Run every available backend (or ``backends_``) against the reference; print the table; True if all pass.

    On CPU tensors the Triton backend is included only under TRITON_INTERPRET=1 (and uses a smaller grid).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = backends_ or backends.available()
    dtypes, norm, attn = _grid(device, full)
    rows: list[Row] = []
    t0 = time.time()
    for name in names:
        interp = name == "triton" and device == "cpu"
        for dtype in dtypes:
            for M, N in (norm[:3] if interp else norm):
                for op in ("layer_norm", "rms_norm"):
                    rows += norm_case(op, name, dtype, M, N, residual=(N % 2 == 1), device=device)
            for (B, Nq, Nk, Hq, Hkv, D, causal, padded) in (attn[:2] if interp else attn):
                caps = capabilities.TABLES[name]
                if str(dtype).replace("torch.", "") not in caps.op_dtypes.get("attention", caps.dtypes):
                    continue  # e.g. the CUDA attention takes fp16/bf16 only (pyllm/capabilities.py)
                rows += attention_case(name, dtype, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded,
                                       device=device)
            for (B, N, Hq, Hk, D, R, inter, per_batch) in (ROTARY_GRID[:2] if interp else ROTARY_GRID):
                rows += rotary_case(name, dtype, B, N, Hq, Hk, D, R, interleaved=inter, batch_tables=per_batch,
                                    device=device)
    _print(rows, out)
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} passed, {len(bad)} failed  ({device}, backends: {', '.join(names)}, "
          f"{time.time() - t0:.1f}s)", file=out)
    return not bad


def _print(rows: list[Row], out) -> None:
    head = f"{'op':<11}{'backend':<10}{'dtype':<9}{'shape':<32}{'tensor':<9}{'max error':>11}{'allowed':>11}  verdict"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(f"{r.op:<11}{r.backend:<10}{r.dtype:<9}{r.shape:<32}{r.tensor:<9}{r.error:>11.2e}{r.allowed:>11.2e}  "
              f"{'ok' if r.ok else 'FAIL'}", file=out)
