"""Run live transformers models on pyllm's kernels: `attn_implementation="pyllm"` and `patch(model)`.

    import pyllm.integrations.hf                  # registers "pyllm" with transformers (when installed)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="pyllm")
    # or, on a model already loaded:
    pyllm.integrations.hf.patch(model)            # attention + LayerNorm/RMSNorm, in place
    print(model.pyllm_patch_report)               # what was swapped, what was left and why

How: transformers (4.48+ / 5.x) dispatches attention through a registry keyed by
`config._attn_implementation`. Importing this module registers a "pyllm" attention function there, and a
"pyllm" mask builder that hands attention the plain (B, Nk) padding mask instead of a (B, 1, Nq, Nk)
tensor whenever that says everything (causal bottom-right or bidirectional, plus padding; or transformers'
sliding-window causal mask (Mistral, Qwen2, ...), recognised by its code, whose window then travels with the
(B, Nk) mask as its ``pyllm_window`` attribute and runs fused as ``window_size``). patch() switches
any model that dispatches through that registry to it, and swaps every `nn.LayerNorm` for
`pyllm.nn.LayerNorm` and every recognised RMSNorm class (transformers' LlamaRMSNorm and its copies in
Qwen2, Mistral, ..., T5LayerNorm; recognised by the code of their forward, see pyllm.nn.recognize) for
pyllm's fused RMSNorm, reusing the same Parameter objects, so optimizers built before patch() keep working.

Per call, anything the fused op cannot express exactly goes to transformers' own implementation of the
model (its `eager_attention_forward`, else SDPA), never to a silent wrong answer: see `fallback_reason`
(T5's position_bias, custom 4-D masks, a layer's sliding window the mask does not carry, soft-capping,
attention sinks, packed sequences, output_attentions together with attention dropout in training).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

import pyllm
from pyllm.nn import LayerNorm
from pyllm.nn.recognize import MatchedRMSNorm, rms_norm_kind

NAME = "pyllm"
# keyword arguments transformers passes to attention functions that do not change the result
_NEUTRAL = {"position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value", "layer_idx",
            "output_hidden_states", "return_dict", "token_type_ids", "max_length_q", "max_length_k",
            "output_attentions", "position_embeddings", "is_causal"}


def _tf(name: str = "transformers"):
    mod = sys.modules.get(name)
    if mod is None:
        raise ValueError(f"pyllm.integrations.hf: {name} is not loaded")
    return mod


# ----------------------------------------------------------------------------- the per-call decision


def fallback_reason(module: nn.Module, query, key, attention_mask, dropout: float, kwargs: dict) -> Optional[str]:
    """None when `pyllm.attention` computes this call exactly; else why transformers' own implementation must.

    This is the one place to switch a case to the fused path once pyllm.attention expresses it (attn_bias
    for T5's position_bias). Sliding windows run fused when the mask carries them (see _mask). Attention dropout runs fused (``dropout_p``) and
    output_attentions comes from ``pyllm.attention_probs`` (exact maps recomputed from the log-sum-exp).
    """
    if kwargs.get("output_attentions") and dropout > 0 and module.training:
        return "output_attentions with attention dropout in training (transformers returns the maps after dropout)"
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        return "a custom or 4-D attention mask"
    if kwargs.get("position_bias") is not None:
        return "position_bias (T5's relative attention bias)"
    window, mask_window = kwargs.get("sliding_window"), getattr(attention_mask, "pyllm_window", None)
    if mask_window is not None and window is not None and window != mask_window:
        return f"the layer's sliding_window {window} differs from the mask's {mask_window}"
    if mask_window is None and window is not None and key.shape[2] > window:
        return f"sliding_window {window} shorter than the {key.shape[2]} keys, and the mask does not carry it"
    extra = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL | {"position_bias", "sliding_window"}
                   and v is not None and v is not False)
    if extra:
        return f"arguments pyllm does not interpret: {extra}"
    return None


def _causal(module, is_causal) -> bool:
    return bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))


def _dense_mask(attention_mask, B, Nq, Nk, causal, device) -> Optional[torch.Tensor]:
    """pyllm's call (2-D padding mask or None, bottom-right causal, the mask's sliding window) as transformers'
    (B, 1, Nq, Nk) bool mask."""
    visible = None
    window = getattr(attention_mask, "pyllm_window", None)
    if window is not None:  # query i (bottom-right aligned) sees keys i - window < j <= i
        visible = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(Nk - Nq).triu(Nk - Nq - window + 1)[None, None]
    elif causal and Nq > 1:
        visible = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(Nk - Nq)[None, None]
    if attention_mask is not None:
        pad = attention_mask[:, None, None, :]
        visible = pad if visible is None else visible & pad
    return None if visible is None else visible.expand(B, 1, Nq, Nk)


def _transformers_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, reason, kwargs):
    """The model's own eager attention (exact for every case above), else transformers' SDPA."""
    B, Nq, Nk = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None or (attention_mask.dim() == 2 and attention_mask.dtype == torch.bool):
        attention_mask = _dense_mask(attention_mask, B, Nq, Nk, _causal(module, is_causal), query.device)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is not None:
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds a float mask
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("output_attentions") or kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"pyllm attention: {reason} needs transformers' eager attention, but "
                                  f"{type(module).__module__} defines no eager_attention_forward")
    sdpa = _tf("transformers.modeling_utils").ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                is_causal=False if attention_mask is not None else is_causal, **kwargs)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
               is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention interface: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D) ->
    (output (B, Nq, Hq, D), attention weights or None)."""
    reason = fallback_reason(module, query, key, attention_mask, dropout, kwargs)
    if reason is not None:
        return _transformers_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                       reason, kwargs)
    # (B, H, N, D) -> (B, N, H, D): transposed views, no copies (kernels take strides); GQA served as is
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    causal = _causal(module, is_causal) and query.shape[2] > 1
    p = dropout if module.training else 0.0  # transformers passes the module's rate; eval never drops
    kw = dict(causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask,
              backend=getattr(module, "_pyllm_backend", None))
    window = getattr(attention_mask, "pyllm_window", None)
    if window is not None:  # transformers' sliding-window causal mask: keys i - window < j <= i (bottom-right)
        kw.update(causal=query.shape[2] > 1, window_size=(window - 1, 0),
                  key_padding_mask=None if bool(attention_mask.all()) else attention_mask)
    if not kwargs.get("output_attentions"):
        return pyllm.attention(q, k, v, dropout_p=p, **kw), None
    o, lse = pyllm.attention(q, k, v, dropout_p=p, return_lse=True, **kw)
    # the exact softmax maps (B, Hq, Nq, Nk), recomputed from q, k and the saved log-sum-exp
    return o, pyllm.attention_probs(q, k, causal=kw["causal"], softmax_scale=scaling,
                                    key_padding_mask=kw["key_padding_mask"], window_size=kw.get("window_size", (-1, -1)),
                                    lse=lse)


def sliding_window_of(mask_function) -> Optional[int]:
    """w when `mask_function` is transformers' ``sliding_window_causal_mask_function(w)`` (recognised by its code:
    ``and_masks(sliding_window_overlay(w), causal_mask_function)``, keys q - w < kv <= q), else None."""
    mu = _tf("transformers.masking_utils")

    def cell(fn, name):
        code = getattr(fn, "__code__", None)
        if code is None or name not in code.co_freevars or not fn.__closure__:
            return None
        return fn.__closure__[code.co_freevars.index(name)].cell_contents

    if getattr(mask_function, "__code__", None) is not mu.and_masks(mu.causal_mask_function).__code__:
        return None
    parts = cell(mask_function, "mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function
            and getattr(parts[0], "__code__", None) is mu.sliding_window_overlay(1).__code__):
        return None
    window = cell(parts[0], "sliding_window")
    return window if isinstance(window, int) and not isinstance(window, bool) and window >= 1 else None


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
          **kwargs):
    """Mask builder: the (B, kv_length) bool padding mask (True = real) or None, when that plus the
    attention's bottom-right causal flag says everything; for transformers' sliding-window causal mask, the
    (B, kv_length) mask (all True without padding) with the window as its ``pyllm_window`` attribute (the
    attention applies it as window_size, bottom-right aligned: sliding caches' offsets included); otherwise
    (custom mask functions, packed sequences, static-cache offsets) transformers' 4-D SDPA mask, which sends
    the call to transformers' own attention (fallback_reason)."""
    mu = _tf("transformers.masking_utils")
    # under torch.compile a mask carrying an attribute is not traceable: sliding windows take the 4-D mask there
    window = None if torch.compiler.is_compiling() else sliding_window_of(mask_function)
    causal = mask_function is mu.causal_mask_function or window is not None
    plain = causal or mask_function is mu.bidirectional_mask_function
    # causal: the last query is the last key (a sliding cache's kv_offset included); bidirectional: no offset
    bottom_right = q_offset + q_length == kv_offset + kv_length if causal else kv_offset == 0
    fits = attention_mask is None or (attention_mask.dim() == 2 and attention_mask.shape[-1] >= kv_offset + kv_length)
    if not (plain and bottom_right and fits):
        sdpa = mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                    kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                    **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})
    if window is not None:  # a mask object, even without padding: it carries the window to the attention
        mask = (torch.ones(batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device")) if attention_mask is None
                else attention_mask[:, kv_offset:kv_offset + kv_length].bool())  # (B, Nk)
        mask.pyllm_window = window
        return mask
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].bool()  # (B, Nk): the columns of the keys
    return None if bool(mask.all()) else mask


def register() -> bool:
    """Register "pyllm" with transformers' AttentionInterface and AttentionMaskInterface; False when
    transformers is not installed (or too old to have them). Idempotent; runs at import."""
    try:
        import transformers
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    transformers.AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    return True


REGISTERED = register()


# ----------------------------------------------------------------------------- patch()


@dataclass
class PatchReport:
    """What patch() did: per class name, how many modules were swapped; what it left as it was, and why."""

    attention: str = "not requested"
    swapped: dict = field(default_factory=dict)  # class name -> count
    left: dict = field(default_factory=dict)  # class name -> reason

    def __str__(self) -> str:
        swapped = ", ".join(f"{n} x{c}" for n, c in self.swapped.items()) or "nothing"
        left = "; ".join(f"{n}: {why}" for n, why in self.left.items()) or "nothing"
        return f"attention: {self.attention}\nnorms and activations swapped: {swapped}\nleft untouched: {left}"


def _swap_norms(model: nn.Module, backend: Optional[str], report: PatchReport) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = type(child).__name__
            if type(child) is nn.LayerNorm:
                new = LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine,
                                bias=child.bias is not None, backend=backend,
                                device=child.weight.device if child.weight is not None else None,
                                dtype=child.weight.dtype if child.weight is not None else None)
                if child.elementwise_affine:
                    new.weight = child.weight  # the same Parameter: optimizers keep tracking it
                    if child.bias is not None:
                        new.bias = child.bias
                new.train(child.training)
            elif (kind := rms_norm_kind(child)) is not None:
                new = MatchedRMSNorm(child, kind, backend=backend)
            else:
                if "norm" in cls.lower() and not isinstance(child, (LayerNorm, pyllm.nn.RMSNorm)):
                    report.left.setdefault(cls, "its forward is not a formula pyllm knows (kept as is)")
                continue
            setattr(parent, name, new)
            report.swapped[cls] = report.swapped.get(cls, 0) + 1


# transformers' tanh-approximated GELUs (one formula, written four ways): pyllm.nn.GELU("tanh") computes it fused
_TANH_GELUS = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation")


def _swap_activations(model: nn.Module, backend: Optional[str], report: PatchReport) -> None:
    import transformers.activations as acts

    classes = tuple(c for c in (getattr(acts, n, None) for n in _TANH_GELUS) if isinstance(c, type))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in classes:
                setattr(parent, name, pyllm.nn.GELU("tanh", backend=backend))
                cls = type(child).__name__
                report.swapped[cls] = report.swapped.get(cls, 0) + 1


def patch(model, attention: bool = True, layer_norm: bool = True, backend: Optional[str] = None,
          activation: bool = True):
    """Switch a transformers model (any architecture, any head) to pyllm attention and norms, in place.

    attention: use attn_implementation "pyllm" (models that do not dispatch through transformers'
        AttentionInterface keep their attention; the report says so).
    layer_norm: swap nn.LayerNorm and recognised RMSNorm classes (weights are the same Parameters).
    backend: a pyllm backend name for every attention, norm and activation call (None = auto).
    activation: swap transformers' tanh-approximated GELU modules (GPT-2's gelu_new and its variants) for
        ``pyllm.nn.GELU("tanh")``, the fused kernel (the same formula; results agree to float rounding).
    Returns the model; `model.pyllm_patch_report` (a PatchReport, print it) says what was swapped and
    what was left untouched.
    """
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise ValueError(f"patch: expected a transformers model (an nn.Module with a .config), got "
                         f"{type(model).__name__}; for plain torch modules use pyllm.nn.replace_modules")
    report = PatchReport()
    if attention:
        if not REGISTERED:
            raise ValueError("patch: transformers with AttentionInterface (4.48+) is needed for attention=True")
        can_set = getattr(type(model), "_can_set_attn_implementation", None)
        if can_set is not None and can_set() and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(NAME)
            for m in model.modules():
                m._pyllm_backend = backend
            report.attention = f"{NAME} (per call, transformers' own where pyllm cannot be exact)"
        else:
            report.attention = (f"left as {getattr(model.config, '_attn_implementation', None)!r}: "
                                f"{type(model).__name__} does not dispatch through transformers' AttentionInterface")
    if layer_norm:
        _swap_norms(model, backend, report)
    if activation:
        _swap_activations(model, backend, report)
    model.pyllm_patch_report = report
    return model
