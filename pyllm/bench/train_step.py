"""The "train_step" op: one AdamW step of a small pyllm GPT (forward, loss, backward, update).

Providers are pyllm backends, selected through ``TransformerConfig.backend`` (every op of the model
runs on it); the baseline is the ``reference`` backend, i.e. the same model in plain PyTorch ops.
The model is cast to the case dtype (pure fp32 / bf16 training, no autocast); dropout is off.
Correctness: loss and every parameter gradient, at a reduced batch, against the model in float64 on
the reference backend, with the rule of :mod:`pyllm.accuracy` applied to relative errors (see
:func:`check_step`).
"""
from __future__ import annotations

import torch

from pyllm import accuracy

from .spec import Case


def _model(case: Case, backend: str, device: str, dtype, seed: int):
    from pyllm.models import GPTForCausalLM, TransformerConfig

    m = dict(case.model)
    cfg = TransformerConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], num_layers=m["layers"],
                            num_heads=m["heads"], max_position_embeddings=max(case.dims[1], 8),
                            hidden_dropout=0.0, backend=backend)
    torch.manual_seed(seed)
    return GPTForCausalLM(cfg).to(device=device, dtype=dtype)


def _batch(case: Case, device: str, seed: int):
    B, T = case.dims
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, dict(case.model)["vocab"], (B, T), generator=g).to(device)


def build_step(case: Case, provider, device: str, seed: int = 0):
    """A zero-argument callable doing one training step on ``provider``'s backend."""
    model = _model(case, provider.backend, device, case.torch_dtype, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = _batch(case, device, seed)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _loss_and_grads(case, backend, device, dtype, seed):
    model = _model(case, backend, device, dtype, seed)
    ids = _batch(case, device, seed)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def check_step(case: Case, provider, device: str, seed: int = 0) -> dict:
    """{"out_ok", "grad_ok", "errors", "worst", "check_label"}: loss and gradients vs the reference precision.

    The loss is held to :func:`pyllm.accuracy.allowed_error` with the peer floor (a whole model sums many
    ops' rounding). Gradients are compared as one figure, the worst relative error max|g - g_ref| / max|g_ref|
    over all parameters, under the same rule with errors measured relative to 1 (a floor of 10x the peer's).
    """
    small = case.with_(dims=(min(case.dims[0], 2), min(case.dims[1], 128)))
    dt = case.torch_dtype
    hi_loss, hi = _loss_and_grads(small, "reference", device, accuracy.reference_dtype(dt), seed)
    lo_loss, lo = _loss_and_grads(small, "reference", device, dt, seed)
    p_loss, pg = _loss_and_grads(small, provider.backend, device, dt, seed)

    def rel(g, ref):
        return float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    floor = accuracy.PEER_REL_FLOOR[case.dtype]
    errors = {"loss": {"err": abs(p_loss - hi_loss),
                       "allowed": accuracy.allowed_error(abs(lo_loss - hi_loss), rel_floor=floor, ref_max=abs(hi_loss))}}
    worst_p = max((rel(pg[n], hi[n]) for n in hi if n in pg), default=float("inf"))
    worst_lo = max(rel(lo[n], hi[n]) for n in hi)
    errors["grads (max relative)"] = {"err": worst_p if set(pg) == set(hi) else float("inf"),
                                      "allowed": accuracy.allowed_error(worst_lo, rel_floor=10 * floor, ref_max=1.0)}
    ok = {n: accuracy.passes(e["err"], e["allowed"]) for n, e in errors.items()}
    out_ok, grad_ok = ok["loss"], ok["grads (max relative)"]
    bad = [f"{n}: err {e['err']:.3g} > allowed {e['allowed']:.3g}" for n, e in errors.items() if not ok[n]]
    return {"out_ok": out_ok, "grad_ok": grad_ok, "errors": errors, "worst": "; ".join(bad),
            "check_label": small.label()}
