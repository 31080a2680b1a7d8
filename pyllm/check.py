"""``pyllm check``: every available backend against the reference, FlashAttention's accuracy rule.

For each case the fast backend's output and every gradient is compared with the reference computed in
higher precision (fp32 math for fp16/bf16 inputs, fp64 for fp32 inputs); the allowed error is twice what
PyTorch itself makes in the input's precision, plus 1e-5:

    max|fast - ref_hi| <= 2 * max|torch_same_dtype - ref_hi| + 1e-5

The same functions (:func:`attention_case`, :func:`norm_case`, :func:`linear_cross_entropy_case`) drive the
test suite.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from pyllm import backends, reference

ATOL = 1e-5


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
        return self.error <= self.allowed  # NaN fails


def _hi(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _grads(outputs, inputs, douts):
    return torch.autograd.grad(outputs, inputs, douts, allow_unused=True)


def _err(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _rows(op, backend, dtype, shape, names, fast, ref, base) -> list[Row]:
    rows = []
    for name, f, r, t in zip(names, fast, ref, base):
        rows.append(Row(op, backend, str(dtype).replace("torch.", ""), shape, name, _err(f, r), 2 * _err(t, r) + ATOL))
    return rows


def attention_case(backend: str, dtype: torch.dtype, B: int, Nq: int, Nk: int, Hq: int, Hkv: int, D: int, *,
                   causal: bool = False, padded: bool = False, device="cpu", seed: int = 0) -> list[Row]:
    """Errors of ``pyllm.attention(backend=...)`` for out, dq, dk, dv on one random case."""
    import pyllm

    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = mk(B, Nq, Hq, D), mk(B, Nk, Hkv, D), mk(B, Nk, Hkv, D)
    do = mk(B, Nq, Hq, D)
    mask = None
    if padded:  # batch row b keeps the first Nk - b*Nk//(B+1) keys; the last row may see none
        lens = [max(Nk - b * (Nk // max(B, 1)) - (1 if b else 0), 0) for b in range(B)]
        mask = (torch.arange(Nk)[None, :] < torch.tensor(lens)[:, None]).to(device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    hi = [t.detach().to(_hi(dtype)).requires_grad_() for t in (q, k, v)]
    lo = [t.detach().requires_grad_() for t in (q, k, v)]
    o = pyllm.attention(*leaves, causal=causal, key_padding_mask=mask, backend=backend)
    o_hi = reference.attention(*hi, causal=causal, key_padding_mask=mask, upcast=False)
    o_lo = reference.attention(*lo, causal=causal, key_padding_mask=mask, upcast=False)
    fast = [o, *_grads(o, leaves, do)]
    ref = [o_hi, *_grads(o_hi, hi, do.to(_hi(dtype)))]
    base = [o_lo, *_grads(o_lo, lo, do)]
    shape = f"B{B} Nq{Nq} Nk{Nk} H{Hq}/{Hkv} D{D}" + (" causal" if causal else "") + (" pad" if padded else "")
    return _rows("attention", backend, dtype, shape, ["out", "dq", "dk", "dv"], fast, ref, base)


def norm_case(op: str, backend: str, dtype: torch.dtype, M: int, N: int, *, residual: bool = False,
              affine: bool = True, device="cpu", seed: int = 0) -> list[Row]:
    """Errors of ``pyllm.layer_norm`` / ``pyllm.rms_norm`` (backend=...) for y (and h) and every gradient."""
    import pyllm

    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, dy = mk(M, N), mk(M, N)
    r = mk(M, N) if residual else None
    w = (1 + 0.1 * mk(N)) if affine else None
    b = (0.1 * mk(N)) if (affine and op == "layer_norm") else None
    params = [t for t in (x, r, w, b) if t is not None]
    names = ["x", "residual", "weight", "bias"]
    names = [n for n, t in zip(names, (x, r, w, b)) if t is not None]

    def run(fn, tensors, upcast_dtype=None):
        d = dict(zip(names, tensors))
        cast = (lambda t: t) if upcast_dtype is None else (lambda t: t)  # noqa: E731
        args = (d["x"], (N,), d.get("weight"))
        if op == "layer_norm":
            args += (d.get("bias"), 1e-5)
        else:
            args += (1e-6,)
        out = fn(*[cast(a) if torch.is_tensor(a) else a for a in args], residual=d.get("residual"))
        y = out[0] if residual else out
        extra = [out[1]] if residual else []
        dys = [dy.to(y.dtype)] + [dy.to(y.dtype) * 0.5 for _ in extra]
        return [y, *extra, *_grads([y, *extra], tensors, dys)]

    leaves = [t.detach().requires_grad_() for t in params]
    hi = [t.detach().to(_hi(dtype)).requires_grad_() for t in params]
    lo = [t.detach().requires_grad_() for t in params]
    pyfn = getattr(pyllm, op)
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
              [t.detach().to(_hi(dtype)).requires_grad_() for t in params])
    base = run(lambda *a, **k: reference.linear_cross_entropy(*a, **k, upcast=False),
               [t.detach().requires_grad_() for t in params])
    shape = (f"N{N} H{H} V{V}" + (" bias" if bias else "") + (f" ign{ignored}" if ignored else "")
             + (f" ls{label_smoothing:g}" if label_smoothing else "") + (f" cap{softcap:g}" if softcap else "")
             + (f" z{z_loss:g}" if z_loss else "") + (" sum" if reduction == "sum" else ""))
    names = ["loss", "dhidden", "dweight"] + (["dbias"] if bias else [])
    return _rows("lin_xent", backend, dtype, shape, names, fast, ref, base)


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


LCE_GRID = [  # (N, H, V, options): odd vocab sizes, ignored rows, smoothing, softcap, z-loss, several chunks
    (37, 24, 101, dict(bias=True, ignored=5, label_smoothing=0.1, chunk_size=16)),
    (19, 16, 32003, dict(ignored=3, chunk_size=8)),
    (23, 32, 257, dict(softcap=5.0, z_loss=1e-4, reduction="sum", ignored=2)),
]


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
                if name == "cuda" and dtype == torch.float32:
                    continue  # the CUDA attention takes fp16/bf16 only (explain() says so)
                rows += attention_case(name, dtype, B, Nq, Nk, Hq, Hkv, D, causal=causal, padded=padded,
                                       device=device)
            for N, H, V, opts in LCE_GRID:
                rows += linear_cross_entropy_case(name, dtype, N, H, V, device=device, **opts)
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
