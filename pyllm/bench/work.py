"""Inputs and callables: turn (case, provider) into the zero-argument function that is timed.

The same code builds the work in the benchmark process and in the CPU memory worker, so both run
exactly the same thing from the same seed.

Modes: ``fwd`` is an inference forward (under ``torch.no_grad``); ``bwd`` runs the forward once
outside the timed region and times ``torch.autograd.grad`` with ``retain_graph``; ``fwd+bwd`` times both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pyllm import accuracy

from .providers import NORM_EPS, Provider
from .spec import Case
from .train_step import build_step


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Inputs in pyllm's layout, not requiring grad (the generators of :mod:`pyllm.accuracy`): attention q, k, v
    (B, N, H, D), mask (every row keeps at least one key: SDPA answers a row without keys with NaN), dout,
    scale; norms x, w, b, r, dy, dh."""
    if case.op == "attention":
        B, Hq, Hkv, Nq, Nk, D = case.dims
        inputs = accuracy.attention_inputs(B, Nq, Nk, Hq, Hkv, D, dtype=case.torch_dtype, device=device,
                                           padded=case.padding, min_keys=1, seed=seed)
        return {**inputs, "scale": D ** -0.5}
    if case.op == "linear_cross_entropy":  # logits ~ N(0, 1); 1 in 16 labels ignored (-100)
        N, H, V = case.dims
        g = torch.Generator(device="cpu").manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=case.torch_dtype)  # noqa: E731
        labels = torch.randint(0, V, (N,), generator=g)
        labels[::16] = -100
        return {"hidden": randn(N, H), "weight": (randn(V, H).float() * H ** -0.5).to(case.torch_dtype),
                "labels": labels.to(device)}
    if case.op == "rotary":  # Llama's tables: (1, N, D/2) float32, theta = position * 10000^(-2i/D)
        B, N, Hq, Hk, D = case.dims
        g = torch.Generator(device="cpu").manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=case.torch_dtype)  # noqa: E731
        theta = torch.arange(N, dtype=torch.float64)[None, :, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
        return {"q": randn(B, N, Hq, D), "k": randn(B, N, Hk, D), "dq": randn(B, N, Hq, D), "dk": randn(B, N, Hk, D),
                "cos": theta.cos().float().to(device), "sin": theta.sin().float().to(device)}
    if case.op == "gelu":  # x ~ 3 N(0, 1): both tails and the bend
        M, N = case.dims
        g = torch.Generator(device="cpu").manual_seed(seed)
        x, dy = ((torch.randn(M, N, generator=g) * s).to(device=device, dtype=case.torch_dtype) for s in (3.0, 1.0))
        return {"x": x, "dy": dy}
    M, N = case.dims
    return accuracy.norm_inputs(case.op, M, N, dtype=case.torch_dtype, device=device, residual=case.residual,
                                seed=seed)


@dataclass
class Call:
    """One provider's forward over leaf tensors in its own layout, plus converters back to pyllm's."""

    forward: Callable[[], tuple]
    leaves: list  # tensors that require grad, in the provider's layout
    grad_outs: list  # one per output
    outs_to_common: Callable[[tuple], tuple]
    grads_to_common: Callable[[tuple], tuple]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def build_call(case: Case, provider: Provider, inputs: dict) -> Call:
    if case.op == "attention":
        return _attention_call(case, provider, inputs)
    if case.op == "linear_cross_entropy":
        h, w = _leaf(inputs["hidden"]), _leaf(inputs["weight"])
        fn = provider.lce_fn(case, h, w, inputs["labels"])
        ident = lambda ts: tuple(ts)  # noqa: E731
        return Call(forward=lambda: (fn(),), leaves=[h, w], grad_outs=[torch.ones((), device=h.device)],
                    outs_to_common=ident, grads_to_common=ident)
    if case.op == "rotary":
        q, k = _leaf(inputs["q"]), _leaf(inputs["k"])
        fn = provider.rotary_fn(case, q, k, inputs["cos"], inputs["sin"])
        ident = lambda ts: tuple(ts)  # noqa: E731
        return Call(forward=lambda: tuple(fn()), leaves=[q, k], grad_outs=[inputs["dq"], inputs["dk"]],
                    outs_to_common=ident, grads_to_common=ident)
    if case.op == "gelu":
        x = _leaf(inputs["x"])
        fn = provider.gelu_fn(case, x)
        ident = lambda ts: tuple(ts)  # noqa: E731
        return Call(forward=lambda: (fn(),), leaves=[x], grad_outs=[inputs["dy"]], outs_to_common=ident,
                    grads_to_common=ident)
    return _norm_call(case, provider, inputs)


def _attention_call(case, provider, inp) -> Call:
    swap = provider.layout == "bhnd"
    conv = (lambda t: t.transpose(1, 2).contiguous()) if swap else (lambda t: t)
    back = (lambda t: t.transpose(1, 2)) if swap else (lambda t: t)
    q, k, v = (_leaf(conv(inp[n])) for n in ("q", "k", "v"))
    fn = provider.attention_fn(case, q, k, v, inp["mask"], inp["scale"])
    return Call(forward=lambda: (fn(),), leaves=[q, k, v], grad_outs=[conv(inp["dout"])],
                outs_to_common=lambda outs: tuple(back(o) for o in outs),
                grads_to_common=lambda gs: tuple(back(t) for t in gs))


def _norm_call(case, provider, inp) -> Call:
    x, w = _leaf(inp["x"]), _leaf(inp["w"])
    b = _leaf(inp["b"]) if inp["b"] is not None else None
    r = _leaf(inp["r"]) if inp["r"] is not None else None
    fn = provider.norm_fn(case, x, w, b, r, NORM_EPS[case.op])
    leaves = [t for t in (x, w, b, r) if t is not None]
    grad_outs = [inp["dy"]] + ([inp["dh"]] if r is not None else [])

    def forward():
        out = fn()
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    ident = lambda ts: tuple(ts)  # noqa: E731
    return Call(forward=forward, leaves=leaves, grad_outs=grad_outs, outs_to_common=ident, grads_to_common=ident)


def mode_fn(call: Call, mode: str) -> Callable[[], object]:
    """The timed function for ``mode``. For ``bwd`` the forward graph is built here, once, untimed."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return call.forward()
        return fwd
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(call.forward(), call.leaves, call.grad_outs)
    if mode == "bwd":
        outs = call.forward()
        return lambda: torch.autograd.grad(outs, call.leaves, call.grad_outs, retain_graph=True)
    raise ValueError(f"mode: expected fwd, bwd or fwd+bwd, got {mode!r}")


def build_timed(case: Case, provider: Provider, device: str, seed: int = 0, inputs: dict | None = None):
    """The zero-argument callable measured for (case, provider); train steps included."""
    if case.op == "train_step":
        return build_step(case, provider, device, seed)
    inputs = make_inputs(case, device, seed) if inputs is None else inputs
    return mode_fn(build_call(case, provider, inputs), case.mode)
