"""``pyllm check``: every available backend against the reference, under FlashAttention's accuracy rule.

The rule, its reference precision and the inputs are defined once, in :mod:`pyllm.accuracy`:

    max|fast - ref_hi| <= 2 * max|torch_same_dtype - ref_hi| + 1e-5

for the output and every gradient. The same functions (:func:`attention_case`, :func:`norm_case`,
:func:`rotary_case`, :func:`linear_cross_entropy_case`, :func:`gelu_case`) drive the test suite.
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
                   causal: bool = False, padded: bool = False, device="cpu", seed: int = 0,
                   dropout_p: float = 0.0, window_size=(-1, -1), softcap: float = 0.0, alibi: bool = False,
                   bias_shape: tuple[int, ...] | None = None) -> list[Row]:
    """Errors of ``pyllm.attention(backend=...)`` for out, dq, dk, dv (and dbias) on one random case.

    The feature keywords are those of :func:`pyllm.attention` (``alibi``: random slopes of shape (Hq,);
    ``bias_shape``: an attn_bias of that shape, broadcastable to (B, Hq, Nq, Nk), whose gradient is checked
    too). With dropout every run uses the same Philox seed, so all compute with the same mask.
    """
    inp = accuracy.attention_inputs(B, Nq, Nk, Hq, Hkv, D, dtype=dtype, device=device, padded=padded, seed=seed)
    q, k, v, do, mask = inp["q"], inp["k"], inp["v"], inp["dout"], inp["mask"]
    hi_dtype = accuracy.reference_dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    extra = {k_: v_ for k_, v_ in (("dropout_p", dropout_p), ("window_size", tuple(window_size)),
                                    ("softcap", softcap)) if v_ not in (0.0, (-1, -1))}
    if alibi:
        extra["alibi_slopes"] = (0.05 + torch.rand(Hq, generator=g)).to(device)
    inputs = [q, k, v] + ([torch.randn(*bias_shape, generator=g).to(device=device, dtype=dtype)] if bias_shape else [])
    leaves = [t.detach().requires_grad_() for t in inputs]
    hi = [t.detach().to(hi_dtype).requires_grad_() for t in inputs]
    lo = [t.detach().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    drop_seed = reference.draw_dropout_seed()
    torch.manual_seed(seed)  # the op draws the same (seed, offset)

    def run(fn, ts, **kw):
        return fn(*ts[:3], causal=causal, key_padding_mask=mask, attn_bias=ts[3] if bias_shape else None,
                  **extra, **kw)

    o = run(ops.attention, leaves, backend=backend)
    o_hi = run(reference.attention, hi, upcast=False, dropout_seed=drop_seed)
    o_lo = run(reference.attention, lo, upcast=False, dropout_seed=drop_seed)
    fast = [o, *_grads(o, leaves, do)]
    ref = [o_hi, *_grads(o_hi, hi, do.to(hi_dtype))]
    base = [o_lo, *_grads(o_lo, lo, do)]
    shape = f"B{B} Nq{Nq} Nk{Nk} H{Hq}/{Hkv} D{D}" + (" causal" if causal else "") + (" pad" if padded else "")
    shape += "".join(f" {n}" for n in (["drop"] if dropout_p else []) + (["win"] if "window_size" in extra else [])
                     + (["cap"] if softcap else []) + (["alibi"] if alibi else []) + (["bias"] if bias_shape else []))
    names = ["out", "dq", "dk", "dv"] + (["dbias"] if bias_shape else [])
    return _rows("attention", backend, dtype, shape, names, fast, ref, base)


def varlen_case(backend: str, dtype: torch.dtype, lens_q: list[int], lens_k: list[int], Hq: int, Hkv: int, D: int,
                *, causal: bool = False, device="cpu", seed: int = 0, **features) -> list[Row]:
    """Errors of ``pyllm.attention_varlen(backend=...)`` (out, dq, dk, dv) against the reference run one
    sequence at a time; ``features`` are attention_varlen's keywords (dropout_p, window_size, softcap, ...)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    hi_dtype = accuracy.reference_dtype(dtype)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v, do = mk(tq, Hq, D), mk(tk, Hkv, D), mk(tk, Hkv, D), mk(tq, Hq, D)
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)  # noqa: E731
    args = (cu(lens_q), cu(lens_k), max(lens_q, default=0), max(lens_k, default=0))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    hi = [t.detach().to(hi_dtype).requires_grad_() for t in (q, k, v)]
    lo = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    drop_seed = reference.draw_dropout_seed()
    torch.manual_seed(seed)
    o = ops.attention_varlen(*leaves, *args, causal=causal, backend=backend, **features)
    o_hi = reference.attention_varlen(*hi, *args, causal=causal, upcast=False, dropout_seed=drop_seed, **features)
    o_lo = reference.attention_varlen(*lo, *args, causal=causal, upcast=False, dropout_seed=drop_seed, **features)
    fast = [o, *_grads(o, leaves, do)]
    ref = [o_hi, *_grads(o_hi, hi, do.to(hi_dtype))]
    base = [o_lo, *_grads(o_lo, lo, do)]
    shape = f"varlen q{lens_q} k{lens_k} H{Hq}/{Hkv} D{D}" + (" causal" if causal else "")
    shape += "".join(f" {n}" for n in sorted(features))
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


def linear_cross_entropy_case(backend: str, dtype: torch.dtype, N: int, H: int, V: int, *, bias: bool = False,
                              ignored: int = 0, label_smoothing: float = 0.0, softcap: float | None = None,
                              z_loss: float = 0.0, reduction: str = "mean", chunk_size: int | None = None,
                              device="cpu", seed: int = 0) -> list[Row]:
    """Errors of ``pyllm.linear_cross_entropy(backend=...)`` for the loss and d(hidden, weight, bias);
    ``ignored`` of the N labels are ignore_index (-100)."""
    import pyllm

    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    wscale = (3.0 if softcap else 1.0) / H**0.5  # logits ~ N(0, 1), or ~ N(0, 9) to exercise the cap
    h, w, b = mk(N, H), (mk(V, H).float() * wscale).to(dtype), (mk(V) * 0.1 if bias else None)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:ignored]] = -100
    labels = labels.to(device)
    params = [t for t in (h, w, b) if t is not None]
    kw = dict(ignore_index=-100, label_smoothing=label_smoothing, softcap=softcap, reduction=reduction,
              z_loss=z_loss)

    def run(fn, tensors):
        loss = fn(*tensors[:2], labels, bias=tensors[2] if bias else None, **kw)
        return [loss, *_grads(loss, tensors, torch.ones_like(loss))]

    fast = run(lambda *a, **k: pyllm.linear_cross_entropy(*a, **k, chunk_size=chunk_size, backend=backend),
               [t.detach().requires_grad_() for t in params])
    ref = run(lambda *a, **k: reference.linear_cross_entropy(*a, **k, upcast=False),
              [t.detach().to(accuracy.reference_dtype(dtype)).requires_grad_() for t in params])
    base = run(lambda *a, **k: reference.linear_cross_entropy(*a, **k, upcast=False),
               [t.detach().requires_grad_() for t in params])
    shape = (f"N{N} H{H} V{V}" + (" bias" if bias else "") + (f" ign{ignored}" if ignored else "")
             + (f" ls{label_smoothing:g}" if label_smoothing else "") + (f" cap{softcap:g}" if softcap else "")
             + (f" z{z_loss:g}" if z_loss else "") + (" sum" if reduction == "sum" else ""))
    names = ["loss", "dhidden", "dweight"] + (["dbias"] if bias else [])
    return _rows("lin_xent", backend, dtype, shape, names, fast, ref, base)


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


def gelu_case(backend: str, dtype: torch.dtype, shape: tuple[int, ...], *, scale: float = 3.0, device="cpu",
              seed: int = 0) -> list[Row]:
    """Errors of ``pyllm.gelu(approximate="tanh", backend=...)`` for y and dx on one random case (inputs
    ``scale`` times a standard normal, so both tails and the bend are exercised); the baseline is
    ``F.gelu(approximate="tanh")`` in the input precision."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, dy = ((torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype) for s in (scale, 1.0))
    hi_dtype = accuracy.reference_dtype(dtype)

    def run(fn, t, d):
        leaf = t.detach().requires_grad_()
        y = fn(leaf)
        return [y, *_grads([y], [leaf], [d])]

    fast = run(lambda t: ops.gelu(t, "tanh", backend=backend), x, dy)
    ref = run(lambda t: reference.gelu_tanh(t, upcast=False), x.to(hi_dtype), dy.to(hi_dtype))
    base = run(lambda t: reference.gelu_tanh(t, upcast=False), x, dy)
    return _rows("gelu_tanh", backend, dtype, "x".join(map(str, shape)), ["y", "dx"], fast, ref, base)


# gelu_tanh: shapes (odd sizes; one past a parallel grain and a widening chunk)
GELU_GRID = [(1,), (37, 29), (3, 5, 1031), (16411,)]
LCE_GRID = [  # (N, H, V, options): odd vocab sizes, ignored rows, smoothing, softcap, z-loss, several chunks
    (37, 24, 101, dict(bias=True, ignored=5, label_smoothing=0.1, chunk_size=16)),
    (19, 16, 32003, dict(ignored=3, chunk_size=8)),
    (23, 32, 257, dict(softcap=5.0, z_loss=1e-4, reduction="sum", ignored=2)),
]


# rotary: (B, N, Hq, Hk, D, rotary_dim, interleaved, per-batch tables)
ROTARY_GRID = [(2, 17, 4, 2, 64, 64, False, False), (3, 13, 3, 1, 40, 24, True, True),
               (1, 97, 2, 2, 128, 128, False, True)]
# FlashAttention's features: (keywords of attention_case, (B, Nq, Nk, Hq, Hkv, D, causal, padded))
FEATURE_CASES = [
    (dict(dropout_p=0.17), (2, 37, 29, 4, 2, 32, False, True)),
    (dict(dropout_p=0.1), (1, 33, 33, 2, 1, 64, True, False)),
    (dict(window_size=(7, 3)), (2, 45, 45, 2, 1, 64, False, True)),
    (dict(window_size=(11, -1)), (1, 29, 53, 2, 2, 40, True, False)),
    (dict(softcap=3.0), (2, 23, 31, 4, 2, 32, True, True)),
    (dict(alibi=True), (2, 31, 31, 4, 4, 32, True, False)),
    (dict(bias_shape=(1, 4, 19, 27)), (2, 19, 27, 4, 2, 32, False, True)),
    (dict(bias_shape=(2, 1, 1, 27)), (2, 19, 27, 2, 1, 16, True, False)),
    (dict(dropout_p=0.1, window_size=(5, 5), softcap=4.0, alibi=True, bias_shape=(2, 2, 17, 21)),
     (2, 17, 21, 2, 1, 32, False, True)),
]
# (lens_q, lens_k, Hq, Hkv, D, causal, features)
VARLEN_CASES = [
    ([5, 0, 17, 9], [5, 3, 17, 12], 4, 2, 32, True, {}),
    ([7, 13], [11, 13], 2, 1, 64, False, dict(dropout_p=0.2, window_size=(4, 2), softcap=2.5)),
]


def _feature_names(kw: dict) -> list[str]:
    names = {"dropout_p": "dropout", "window_size": "window", "softcap": "softcap", "alibi": "alibi",
             "alibi_slopes": "alibi", "bias_shape": "attn_bias"}
    return [names[k] for k in kw]


def feature_rows(name: str, dtype: torch.dtype, device: str, notes: set[str] | None = None,
                 few: bool = False) -> list[Row]:
    """The feature grid for one backend; features it does not implement are added to ``notes``, not run.
    ``few``: only the cases that combine features (the Triton interpreter is slow)."""
    rows: list[Row] = []
    notes = set() if notes is None else notes
    have = capabilities.TABLES[name].attention_features if name != "reference" else None
    for kw, (B, Nq, Nk, Hq, Hkv, D, causal, padded) in FEATURE_CASES:
        if few and len(kw) < 5:
            continue
        missing = [f for f in _feature_names(kw) if have is not None and f not in have]
        if missing:
            notes.add(f"{name}: {', '.join(missing)} not implemented (auto serves such calls elsewhere)")
            continue
        rows += attention_case(name, dtype, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded, device=device, **kw)
    for lq, lk, Hq, Hkv, D, causal, kw in VARLEN_CASES:
        missing = [f for f in ["varlen"] + _feature_names(kw) if have is not None and f not in have]
        if missing:
            notes.add(f"{name}: {', '.join(missing)} not implemented (auto serves such calls elsewhere)")
            continue
        rows += varlen_case(name, dtype, lq, lk, Hq, Hkv, D, causal=causal, device=device, **kw)
    return rows


def check(backends_: list[str] | None = None, *, device: str | None = None, full: bool = False,
          out=sys.stdout) -> bool:
    """Run every available backend (or ``backends_``) against the reference; print the table; True if all pass.

    On CPU tensors the Triton backend is included only under TRITON_INTERPRET=1 (and uses a smaller grid).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = backends_ or backends.available()
    dtypes, norm, attn = _grid(device, full)
    rows: list[Row] = []
    notes: set[str] = set()
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
            for N, H, V, opts in LCE_GRID:
                rows += linear_cross_entropy_case(name, dtype, N, H, V, device=device, **opts)
            for (B, N, Hq, Hk, D, R, inter, per_batch) in (ROTARY_GRID[:2] if interp else ROTARY_GRID):
                rows += rotary_case(name, dtype, B, N, Hq, Hk, D, R, interleaved=inter, batch_tables=per_batch,
                                    device=device)
            for shape in (GELU_GRID[:3] if interp else GELU_GRID):
                rows += gelu_case(name, dtype, shape, device=device)
            caps = capabilities.TABLES[name]
            if str(dtype).replace("torch.", "") in caps.op_dtypes.get("attention", caps.dtypes):
                rows += feature_rows(name, dtype, device, notes, few=interp)
    _print(rows, out)
    for note in sorted(notes):
        print(note, file=out)
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
