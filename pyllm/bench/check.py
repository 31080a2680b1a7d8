"""Is it right? Every provider's output and gradients are checked against pyllm.reference before timing.

The rule is the one of :mod:`pyllm.accuracy` (FlashAttention's 2x rule, its reference precision): pyllm's
own backends are held to it strictly; PyTorch's kernels and peer libraries get its documented peer floor
(``rel_floor=PEER_REL_FLOOR``) so that summation-order noise of, e.g., torch's bf16 CPU LayerNorm is not
called wrong. Large cases are checked at a reduced shape (fewer batches, then shorter sequences or fewer
rows) when the reference would not fit ``REF_BUDGET``.
"""
from __future__ import annotations

import math

import torch

from pyllm import accuracy

from .providers import NORM_EPS
from .spec import Case
from .work import Call

REF_BUDGET = {"cpu": 1 << 30, "cuda": 16 << 30}


def ref_bytes(case: Case) -> int:
    """Rough bytes the float64 reference needs (scores, probabilities and their gradients)."""
    if case.op == "attention":
        B, Hq, _, Nq, Nk, _ = case.dims
        return 8 * 6 * B * Hq * Nq * Nk
    if case.op == "linear_cross_entropy":
        N, _, V = case.dims
        return 8 * 4 * N * V  # logits, log-softmax, their gradients
    if case.op == "rotary":
        B, N, Hq, Hk, D = case.dims
        return 8 * 6 * B * N * (Hq + Hk) * D
    if case.op == "gelu":
        M, N = case.dims
        return 8 * 4 * M * N
    M, N = case.dims
    return 8 * 10 * M * N


def check_case(case: Case, device: str) -> Case:
    """The case itself, or a smaller one of the same kind when the reference would not fit the budget."""
    budget = REF_BUDGET.get(device, REF_BUDGET["cpu"])
    c = case
    if c.op == "attention":
        B, Hq, Hkv, Nq, Nk, D = c.dims
        while ref_bytes(c) > budget and B > (2 if c.padding else 1):
            B = max(2 if c.padding else 1, B // 2)
            c = c.with_(dims=(B, Hq, Hkv, Nq, Nk, D))
        while ref_bytes(c) > budget and min(Nq, Nk) > 128:
            Nq, Nk = max(128, Nq // 2), max(128, Nk // 2)
            c = c.with_(dims=(B, Hq, Hkv, Nq, Nk, D))
    elif c.op == "linear_cross_entropy":
        N, H, V = c.dims
        while ref_bytes(c) > budget and N > 16:
            N //= 2
            c = c.with_(dims=(N, H, V))
    elif c.op in ("layer_norm", "rms_norm", "gelu"):
        M, N = c.dims
        while ref_bytes(c) > budget and M > 64:
            M //= 2
            c = c.with_(dims=(M, N))
    return c


def _names(case: Case) -> tuple[list[str], list[str]]:
    if case.op == "attention":
        return ["out"], ["dq", "dk", "dv"]
    if case.op == "linear_cross_entropy":
        return ["loss"], ["dhidden", "dweight"]
    if case.op == "rotary":
        return ["q", "k"], ["dq", "dk"]
    if case.op == "gelu":
        return ["y"], ["dx"]
    outs = ["y"] + (["h"] if case.residual else [])
    grads = ["dx", "dw"] + (["db"] if case.op == "layer_norm" else []) + (["dresidual"] if case.residual else [])
    return outs, grads


def _reference_run(case: Case, inputs: dict, to: torch.dtype | None):
    """pyllm.reference's outputs and gradients, computed in dtype ``to`` (None = the inputs' own dtype)."""
    from pyllm import reference as R

    cast = (lambda t: t.detach().to(to)) if to is not None else (lambda t: t.detach())
    if case.op == "attention":
        leaves = [cast(inputs[n]).requires_grad_(True) for n in ("q", "k", "v")]
        out = R.attention(*leaves, causal=case.causal, softmax_scale=inputs["scale"],
                          key_padding_mask=inputs["mask"], upcast=False)
        outs, gouts = (out,), [cast(inputs["dout"])]
    elif case.op == "linear_cross_entropy":
        leaves = [cast(inputs[n]).requires_grad_(True) for n in ("hidden", "weight")]
        out = R.linear_cross_entropy(*leaves, inputs["labels"], upcast=False)
        outs, gouts = (out,), [torch.ones_like(out)]
    elif case.op == "rotary":
        leaves = [cast(inputs[n]).requires_grad_(True) for n in ("q", "k")]
        tables = [inputs[n].to(to or leaves[0].dtype) for n in ("cos", "sin")]
        outs = R.rotary(*leaves, *tables, upcast=False)
        gouts = [cast(inputs["dq"]), cast(inputs["dk"])]
    elif case.op == "gelu":
        leaves = [cast(inputs["x"]).requires_grad_(True)]
        outs, gouts = (R.gelu_tanh(leaves[0], upcast=False),), [cast(inputs["dy"])]
    else:
        names = [n for n in ("x", "w", "b", "r") if inputs[n] is not None]
        t = {n: cast(inputs[n]).requires_grad_(True) for n in names}
        N = inputs["x"].shape[-1]
        if case.op == "layer_norm":
            out = R.layer_norm(t["x"], (N,), t["w"], t.get("b"), NORM_EPS[case.op], residual=t.get("r"), upcast=False)
        else:
            out = R.rms_norm(t["x"], (N,), t["w"], NORM_EPS[case.op], residual=t.get("r"), upcast=False)
        outs = tuple(out) if isinstance(out, tuple) else (out,)
        leaves = [t[n] for n in names]
        gouts = [cast(inputs["dy"])] + ([cast(inputs["dh"])] if case.residual else [])
    grads = torch.autograd.grad(outs, leaves, gouts)
    return [o.detach() for o in outs], [g.detach() for g in grads]


def reference(case: Case, inputs: dict) -> dict:
    """{"hi": (outs, grads) in the rule's reference precision, "lo": the same computed in the input dtype}."""
    hi = _reference_run(case, inputs, accuracy.reference_dtype(case.torch_dtype))
    lo = _reference_run(case, inputs, None)
    return {"hi": hi, "lo": lo}


def run_provider(call: Call) -> tuple[list, list | str]:
    """The provider's outputs and gradients, converted to pyllm's layout.

    A backward that raises gives its message in place of the gradients (the forward may still be timed).
    """
    outs = call.forward()
    try:
        grads = torch.autograd.grad(outs, call.leaves, call.grad_outs)
    except Exception as e:  # noqa: BLE001
        return [o.detach() for o in call.outs_to_common(outs)], f"backward failed: {type(e).__name__}: {e}"
    return [o.detach() for o in call.outs_to_common(outs)], [g.detach() for g in call.grads_to_common(grads)]


def verdict(case: Case, ref: dict, outs: list, grads: list, *, peer: bool = True) -> dict:
    """{"out_ok", "grad_ok", "errors": {name: {"err", "allowed"}}, "worst": text} for one provider.

    PyTorch's own error is the larger of its math in the input dtype (``ref["lo"]``) and, when present,
    its native op, the baseline provider (``ref["base"]``): torch's CPU bf16 LayerNorm, for one,
    accumulates dweight/dbias less precisely than plain bf16 math does. ``peer=False`` (pyllm's own
    backends) applies the strict rule, without the peer floor.
    """
    out_names, grad_names = _names(case)
    floor = accuracy.PEER_REL_FLOOR[case.dtype] if peer else 0.0
    errors, out_ok, grad_ok = {}, True, True
    grad_error = grads if isinstance(grads, str) else None
    if grad_error:
        grads, grad_ok = [], False
    base_run = ref.get("base") or ([None] * len(out_names), [None] * len(grad_names))
    for kind, names, got, hi, lo, bl in (("out", out_names, outs, ref["hi"][0], ref["lo"][0], base_run[0]),
                                         ("grad", grad_names, grads, ref["hi"][1], ref["lo"][1], base_run[1])):
        for name, g, h, l, b in zip(names, got, hi, lo, bl):
            base = accuracy.max_error(l, h)
            if b is not None and math.isfinite(bb := accuracy.max_error(b, h)):
                base = max(base, bb)
            allowed = accuracy.allowed_error(base, rel_floor=floor, ref_max=float(h.abs().max()) if h.numel() else 0.0)
            err = accuracy.max_error(g, h)  # inf when the shapes differ
            ok = accuracy.passes(err, allowed)
            errors[name] = {"err": err, "allowed": allowed}
            if not ok:
                out_ok = out_ok and kind != "out"
                grad_ok = grad_ok and kind != "grad"
    bad = [f"{n}: max err {e['err']:.3g} > allowed {e['allowed']:.3g}" for n, e in errors.items()
           if not accuracy.passes(e["err"], e["allowed"])]
    return {"out_ok": out_ok, "grad_ok": grad_ok, "errors": errors, "worst": "; ".join(bad),
            "grad_error": grad_error[:300] if grad_error else None}
