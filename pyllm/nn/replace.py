"""Swap torch's LayerNorm / RMSNorm / MultiheadAttention (and recognised RMSNorm classes of other libraries,
see pyllm.nn.recognize) for pyllm's, in place, weights kept."""
from __future__ import annotations

import warnings

import torch

from pyllm.nn.attention import MultiheadAttention
from pyllm.nn.norm import LayerNorm, RMSNorm
from pyllm.nn.recognize import MatchedRMSNorm, rms_norm_kind


def _convert(module: torch.nn.Module) -> torch.nn.Module | None:
    if isinstance(module, (LayerNorm, RMSNorm, MultiheadAttention)):
        return None  # already pyllm's
    if type(module) is torch.nn.LayerNorm:
        new = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                        bias=module.bias is not None)
    elif type(module) is torch.nn.RMSNorm:
        new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine)
    elif type(module) is torch.nn.MultiheadAttention:
        new = MultiheadAttention(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn,
            kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first,
        )
    elif (kind := rms_norm_kind(module)) is not None:  # transformers' LlamaRMSNorm and copies, T5LayerNorm
        return MatchedRMSNorm(module, kind)  # shares the weight Parameter
    else:
        return None
    ref = next(iter(module.parameters()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    return new


def _keep_pyllm_modules_called(layer: torch.nn.Module, inputs):
    """A forward pre-hook that does nothing: its presence turns off torch's TransformerEncoderLayer fast path."""
    return None


def _turn_off_fast_paths(model: torch.nn.Module) -> int:
    """torch's TransformerEncoderLayer, in eval mode under no_grad, runs one fused native kernel
    (``torch._transformer_encoder_layer_fwd``) that reads the submodules' weights and never calls them, so
    the swapped modules would be bypassed. Any forward hook on the layer turns that path off (torch checks
    for hooks); TransformerEncoder's nested-tensor path is turned off too. Returns the layers changed."""
    changed = 0
    for m in model.modules():
        if isinstance(m, torch.nn.TransformerEncoder):
            m.use_nested_tensor = False
        if isinstance(m, torch.nn.TransformerEncoderLayer) and not getattr(m, "_pyllm_fast_path_off", False):
            m.register_forward_pre_hook(_keep_pyllm_modules_called)
            m._pyllm_fast_path_off = True
            changed += 1
    return changed


def replace_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``torch.nn.LayerNorm``, ``RMSNorm`` and ``MultiheadAttention`` in ``model`` in place, and
    every module whose forward is a known RMSNorm formula (transformers' ``LlamaRMSNorm`` and its copies in
    Qwen2, Mistral, ..., ``T5LayerNorm``; see :mod:`pyllm.nn.recognize`).

    Parameters (values, dtype, device, requires_grad) and train/eval mode are kept; returns ``model``.
    A model that is itself one of those modules cannot be replaced in place: use the returned module.
    In a ``torch.nn.TransformerEncoder(Layer)`` whose modules were swapped, torch's inference fast path
    (eval mode under no_grad, which would bypass them) is turned off, with a warning that says so.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"replace_modules: model must be a torch.nn.Module, got {type(model).__name__}")
    top = _convert(model)
    if top is not None:
        return top
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _convert(child)
            if new is not None:
                for (_, p_new), (_, p_old) in zip(new.named_parameters(), child.named_parameters()):
                    p_new.requires_grad_(p_old.requires_grad)
                setattr(parent, name, new)
                swapped += 1
    layers = _turn_off_fast_paths(model) if swapped else 0
    if layers:
        warnings.warn(f"replace_modules: torch's TransformerEncoderLayer fast path (eval mode under no_grad) "
                      f"would bypass pyllm's modules; it is turned off for {layers} swapped layer(s) "
                      f"(a no-op forward pre-hook) and for their TransformerEncoder's nested-tensor path",
                      stacklevel=2)
    return model
