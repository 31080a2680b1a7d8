"""Run a live transformers BERT or GPT-2 model on pyllm's kernels, in place.

    model = transformers.AutoModel.from_pretrained(folder)
    pyllm.integrations.hf.patch(model)            # attention and LayerNorm now go through pyllm

How: transformers (4.48+ / 5.x) dispatches attention through a registry keyed by
`config._attn_implementation`. patch() registers a "pyllm" attention function there, plus a
"pyllm" mask builder that hands attention the plain (B, Nk) padding mask instead of a
(B, 1, Nq, Nk) tensor, and switches the model to it. Every `nn.LayerNorm` is swapped for
`pyllm.nn.LayerNorm` reusing the same Parameter objects, so optimizers built before patch()
keep working.

Limits: attention-probability dropout is not applied (the fused op has none); a warning says so
once when a patched model trains with it. Custom 4-D masks, packed sequences and
output_attentions fall back to transformers' own SDPA path (correct, not fused).

pyllm never imports transformers: patch() uses the transformers modules already loaded by the
model it is given.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

from torch import nn

import pyllm
from pyllm.nn import LayerNorm

_SUPPORTED = ("bert", "gpt2")
_warned_dropout = False


def _tf(name: str = "transformers"):
    mod = sys.modules.get(name)
    if mod is None:
        raise ValueError(f"patch: expected a transformers model, but {name} is not loaded")
    return mod


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
          **kwargs):
    """Mask builder: the (B, kv_length) bool padding mask (True = real) or None; anything our
    attention cannot express (custom mask functions, offsets) gets transformers' 4-D SDPA mask."""
    mu = _tf("transformers.masking_utils")
    plain = mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function)
    bottom_right = kv_offset == 0 and (mask_function is not mu.causal_mask_function
                                       or q_offset == kv_length - q_length)
    fits = attention_mask is None or (attention_mask.dim() == 2 and attention_mask.shape[-1] >= kv_length)
    if not (plain and bottom_right and fits):
        sdpa = mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                    kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                    **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()  # (B, Nk)
    return None if bool(mask.all()) else mask


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
               is_causal: Optional[bool] = None, **kwargs):
    """transformers attention interface: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D) ->
    (output (B, Nq, Hq, D), None)."""
    global _warned_dropout
    if (attention_mask is not None and attention_mask.dim() != 2) or kwargs.get("output_attentions"):
        sdpa = _tf("transformers.modeling_utils").ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    is_causal=is_causal, **kwargs)
    if dropout > 0 and module.training and not _warned_dropout:
        warnings.warn(f"pyllm attention: attention-probability dropout ({dropout}) is not applied "
                      f"(the fused kernel has none); hidden dropout still is", stacklevel=2)
        _warned_dropout = True
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    # (B, H, N, D) -> (B, N, H, D): transposed views, no copies (kernels take strides)
    o = pyllm.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        causal=bool(causal) and query.shape[2] > 1, softmax_scale=scaling,
                        key_padding_mask=attention_mask, backend=getattr(module, "_pyllm_backend", None))
    return o, None


def _register():
    _tf("transformers").AttentionInterface.register("pyllm", _attention)
    _tf("transformers.masking_utils").AttentionMaskInterface.register("pyllm", _mask)


def _swap_layer_norms(model: nn.Module, backend: Optional[str]) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.LayerNorm:
                continue
            ref = child.weight
            new = LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine,
                            bias=child.bias is not None, backend=backend,
                            device=ref.device if ref is not None else None,
                            dtype=ref.dtype if ref is not None else None)
            if child.elementwise_affine:
                new.weight = child.weight  # the same Parameter: optimizers keep tracking it
                if child.bias is not None:
                    new.bias = child.bias
            new.train(child.training)
            setattr(parent, name, new)
            count += 1
    return count


def patch(model, attention: bool = True, layer_norm: bool = True, backend: Optional[str] = None):
    """Switch a transformers BERT or GPT-2 model (any head) to pyllm attention and LayerNorm, in place.

    backend: a pyllm backend name for every attention and LayerNorm call (None = auto).
    Returns the model.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED:
        raise ValueError(f"patch: expected a transformers BERT or GPT-2 model (model_type in {_SUPPORTED}), "
                         f"got {type(model).__name__} with model_type {model_type!r}")
    if attention:
        _register()
        model.set_attn_implementation("pyllm")
        for m in model.modules():
            m._pyllm_backend = backend
    if layer_norm:
        _swap_layer_norms(model, backend)
    return model
