"""Llama-family decoders (Llama 2/3, Qwen2, Mistral) on pyllm's fused ops, and their heads.

One layout serves the three Hugging Face model types: pre-norm RMSNorm blocks whose residual adds are
fused into the next norm, rotary position embeddings, grouped-query attention through
`pyllm.attention` (K/V never repeated per head), a SwiGLU MLP, tied or untied embeddings. What differs
is configuration: Qwen2's q/k/v bias (`attention_bias`), Mistral's and Qwen2's sliding window, the
rope scaling of Llama 3 ("llama3"), "linear" and "dynamic" (NTK).

    model(input_ids, attention_mask=None, position_ids=None, labels=None, cache=None, use_cache=False)

`attention_mask` (B, N) with 1 = a real token. Positions count real tokens only (from the mask), as
transformers' generate() does, so a left-padded row computes exactly what it would alone.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pyllm
from pyllm.nn import Linear, RMSNorm

from .base import (CausalLMOutput, PreTrainedModel, causal_lm_head, decoder_forward, last_token_classification,
                   lm_head_and_loss)
from .block import KVCache, PackedSequences, StackPlan, packed_attention
from .config import TransformerConfig
from .generation import generate

MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaConfig(TransformerConfig):
    """TransformerConfig plus what the Llama family adds. Defaults are Llama's own.

    head_dim: None = hidden_size // num_heads (Mistral-Nemo-like configs set it explicitly).
    rope_scaling: None or {"rope_type": "linear" | "dynamic" | "llama3", "factor": ..., and for llama3
        "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    sliding_window: keys older than this many positions are hidden (j > i - sliding_window), on the
        layers whose `layer_types` entry is "sliding_attention" (all layers when layer_types is None).
    """

    vocab_size: int = 32000
    activation: str = "silu"
    norm_position: Optional[str] = "pre"
    norm_eps: float = 1e-6
    hidden_dropout: float = 0.0
    type_vocab_size: int = 0
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    model_type: str = "llama"
    head_dim: Optional[int] = None  # shadows TransformerConfig.head_dim (a property there)
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False  # bias on q, k, v (Qwen2)
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.norm_position != "pre":
            raise ValueError(f"LlamaConfig: norm_position must be 'pre' (Llama blocks are pre-norm), "
                             f"got {self.norm_position!r}")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be a positive even int (rotary pairs), got {self.head_dim!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig: rope_theta must be > 0, got {self.rope_theta!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"LlamaConfig: sliding_window must be None or an int >= 1, got {self.sliding_window!r}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"LlamaConfig: layer_types must list one of {LAYER_TYPES} per layer "
                                 f"({self.num_layers}), got {self.layer_types!r}")
        rope_inv_freq(self)  # validates rope_scaling

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of `layer`, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))


# ----------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(config: LlamaConfig, seq_len: Optional[int] = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32 of config's rope type, as transformers computes them.

    seq_len matters for "dynamic" only: beyond max_position_embeddings the base grows (NTK scaling).
    """
    D = config.head_dim
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    if kind not in ROPE_TYPES:
        raise ValueError(f"LlamaConfig: rope_scaling type {kind!r} is not supported; supported types are "
                         f"{ROPE_TYPES}")

    def need(key):
        if key not in scaling:
            raise ValueError(f"LlamaConfig: rope_scaling of type {kind!r} needs the field {key!r}, got {scaling}")
        return float(scaling[key])

    base = float(config.rope_theta)
    if kind == "dynamic":
        factor, L = need("factor"), config.max_position_embeddings
        n = max(seq_len or L, L)
        base = base * ((factor * n / L) - (factor - 1)) ** (D / (D - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if kind == "linear":
        inv_freq = inv_freq / need("factor")
    elif kind == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old = need("original_max_position_embeddings")
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def position_limits(config: LlamaConfig):
    """What input checks read: max_position_embeddings bounds positions, except under "dynamic" rope
    scaling, whose whole point is to run past it."""
    if config.rope_type != "dynamic":
        return config
    return SimpleNamespace(vocab_size=config.vocab_size, max_position_embeddings=sys.maxsize)


class RotaryEmbedding(nn.Module):
    """position_ids (B or 1, N) -> cos, sin (B or 1, N, head_dim // 2) float32, the tables of pyllm.rotary."""

    direct_decode = True  # block.direct_decode_ok: its forward may be called directly

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, position_ids: torch.Tensor):
        inv_freq = self.inv_freq
        if self.config.rope_type == "dynamic":
            n = int(position_ids.max()) + 1
            if n > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, n).to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, N, D/2), fp32 like transformers
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in plain PyTorch (what pyllm.rotary fuses; the benchmark's baseline):
    x (B, N, H, D), cos/sin (B or 1, N, D/2) -> (B, N, H, D). Pairs are (x[i], x[i + D/2]), the layout
    of transformers' Llama weights."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, :, None], sin[:, :, None]  # (B, N, 1, D/2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


# ----------------------------------------------------------------------------- blocks


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.backend, self.window = config.backend, config.window(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v in one matmul; GQA makes the k and v parts narrower
        self.qkv = Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                          bias=config.attention_bias, backend=config.backend)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False, backend=config.backend)

    def forward(self, x, cos, sin, key_padding_mask=None, cache: Optional[KVCache] = None, layer_idx: int = 0):
        B, N, _ = x.shape
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([hq, hkv, hkv], dim=-1)
        # views of the packed projection go into the fused rotary op as they are (no copies)
        q, k = pyllm.rotary(q.view(B, N, self.num_heads, self.head_dim), k.view(B, N, self.num_kv_heads, self.head_dim),
                            cos, sin, backend=self.backend)  # (B, N, Hq, D), (B, N, Hkv, D)
        v = v.view(B, N, self.num_kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, past + N, Hkv, D)
        # query i (bottom-right aligned) sees keys i - window < j <= i: blocks outside the window are skipped
        window = (-1, -1) if self.window is None else (self.window - 1, 0)
        if isinstance(key_padding_mask, PackedSequences):  # packed documents: one varlen call, window fused
            o = packed_attention(q, k, v, key_padding_mask, causal=True, window_size=window, backend=self.backend)
        else:
            o = pyllm.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, window_size=window,
                                backend=self.backend)
        return self.o_proj(o.reshape(B, N, hq))  # (B, N, C)

    direct_decode = True

    def decode(self, x, cos, sin, key_padding_mask, cache: KVCache, layer_idx: int):
        """forward in eval mode with a cache for generate()'s decode loop, the Linear layers' forward called
        directly (block.direct_decode_ok checked once that this is exact). Mirrors forward: keep them in step."""
        B, N, _ = x.shape
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv.forward(x).split_with_sizes([hq, hkv, hkv], dim=-1)
        q, k = pyllm.rotary(q.view(B, N, self.num_heads, self.head_dim), k.view(B, N, self.num_kv_heads, self.head_dim),
                            cos, sin, backend=self.backend)
        k, v = cache.update(layer_idx, k, v.view(B, N, self.num_kv_heads, self.head_dim))
        window = (-1, -1) if self.window is None else (self.window - 1, 0)
        o = pyllm.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, window_size=window,
                            backend=self.backend)
        return self.o_proj.forward(o.reshape(B, N, hq))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up in one matmul."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias,
                              backend=config.backend)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias, backend=config.backend)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    direct_decode = True

    def decode(self, x):
        """forward, the Linear layers' forward called directly (see LlamaAttention.decode)."""
        gate, up = self.gate_up.forward(x).split(self.intermediate, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Takes and returns (hidden, residual) with the residual add deferred into the next norm:
    r = hidden + r;  h = attn(norm1(r));  r = h + r;  hidden = mlp(norm2(r))."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
        self.self_attn = LlamaAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
        self.mlp = LlamaMLP(config)

    def forward(self, x, residual, cos, sin, key_padding_mask=None, cache=None, layer_idx=0):
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed, residual = self.input_layernorm(x, residual=residual)
        a = self.self_attn(normed, cos, sin, key_padding_mask, cache, layer_idx)
        normed, residual = self.post_attention_layernorm(a, residual=residual)
        return self.mlp(normed), residual  # (B, N, C) each

    direct_decode = True

    def decode(self, x, residual, cos, sin, key_padding_mask, cache: KVCache, layer_idx: int):
        """forward in eval mode with a cache, the submodules' forward called directly (see
        LlamaAttention.decode). Mirrors forward: keep the two in step."""
        if residual is None:
            residual, normed = x, self.input_layernorm.forward(x)
        else:
            normed, residual = self.input_layernorm.forward(x, residual=residual)
        a = self.self_attn.decode(normed, cos, sin, key_padding_mask, cache, layer_idx)
        normed, residual = self.post_attention_layernorm.forward(a, residual=residual)
        return self.mlp.decode(normed), residual


class LlamaLayers(nn.ModuleList):
    """The blocks; owns the gradient checkpointing switch (PreTrainedModel.gradient_checkpointing)."""

    is_layer_stack = True
    gradient_checkpointing = False
    direct_decode = True


# ----------------------------------------------------------------------------- models


class LlamaModel(PreTrainedModel):
    """Token embeddings -> pre-norm RMSNorm blocks with RoPE -> final RMSNorm.

    forward -> BaseModelOutput(last_hidden_state (B, N, C), cache). With `cache` (a KVCache, filled
    in place) the N tokens continue the cached ones; attention_mask then covers cached + new: (B, past + N).
    """

    family = "llama"
    default_norm_position = "pre"
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"{type(self).__name__}: config must be a LlamaConfig, got {type(config).__name__}")
        super().__init__(config)
        config = self.config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = LlamaLayers(LlamaBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
        self.rotary = RotaryEmbedding(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                use_cache: bool = False, cu_seqlens=None):
        return decoder_forward(self, position_limits(self.config), input_ids, attention_mask, None, position_ids,
                               cache, use_cache, cu_seqlens)

    direct_decode = True

    def decode_step(self, input_ids, position_ids, key_padding_mask=None, cache: Optional[KVCache] = None,
                    direct: bool = False, plan: Optional[StackPlan] = None):
        """forward without the input checks and mask derivations, for generate()'s decode loop, which checks
        once: input_ids (B, N), position_ids (B or 1, N), key_padding_mask (B, past + N) bool or None
        -> last hidden state (B, N, C). direct=True (only where block.direct_decode_ok(self), with a cache)
        calls the submodules' forward directly: the same ops, without nn.Module's per-call cost; with it,
        plan (decode_plan()) runs the blocks as one C++ call where it can."""
        if direct:
            x = self.embed_tokens.forward(input_ids)
            cos, sin = self.rotary.forward(position_ids)
            if plan is not None:
                y = plan(x, key_padding_mask, cache, cos, sin)
                if y is not None:
                    return y
            residual = None
            for i, layer in enumerate(self.layers):
                x, residual = layer.decode(x, residual, cos, sin, key_padding_mask, cache, i)
            return self.norm.forward(x, residual=residual)[0]
        x = self.embed_tokens(input_ids)  # (B, N, C)
        cos, sin = self.rotary(position_ids)  # (B or 1, N, D/2) float32, shared by every layer
        use_ckpt = self.layers.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        residual = None
        for i, layer in enumerate(self.layers):
            if use_ckpt:
                x, residual = checkpoint(layer, x, residual, cos, sin, key_padding_mask, None, i, use_reentrant=False)
            else:
                x, residual = layer(x, residual, cos, sin, key_padding_mask, cache, i)
        return self.norm(x, residual=residual)[0]  # (B, N, C)

    def decode_plan(self) -> Optional[StackPlan]:
        """decode_step's plan (None: the decode methods run): see block.StackPlan. Sliding-window layers
        (their attention takes the feature path) are left to the decode methods."""
        blocks = list(self.layers)
        if not blocks or any(b.self_attn.window is not None for b in blocks):
            return None
        layers = [(b.input_layernorm.weight, None, b.self_attn.qkv.weight, b.self_attn.qkv.bias,
                   b.self_attn.o_proj.weight, b.self_attn.o_proj.bias, b.post_attention_layernorm.weight, None,
                   b.mlp.gate_up.weight, b.mlp.gate_up.bias, b.mlp.down_proj.weight, b.mlp.down_proj.bias)
                  for b in blocks]
        a = blocks[0].self_attn
        return StackPlan.build(self, layers, (self.norm.weight, None), RMSNorm, a.num_heads, a.num_kv_heads,
                               a.head_dim, True, "swiglu", blocks[0].mlp.intermediate)


class LlamaForCausalLM(PreTrainedModel):
    """LlamaModel + a language-model head (tied to the embeddings when tie_word_embeddings). labels and
    return_logits as GPTForCausalLM's (base.lm_head_and_loss): in training with labels the loss is fused
    (``pyllm.linear_cross_entropy``) and logits is None unless return_logits=True."""

    family = "llama"
    default_norm_position = "pre"
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        config = self.config
        self.model = LlamaModel(config)
        self.lm_head = causal_lm_head(self, self.model.embed_tokens)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                cache: Optional[KVCache] = None, use_cache: bool = False, return_logits: Optional[bool] = None,
                cu_seqlens=None):
        out = self.model(input_ids, attention_mask, position_ids, cache, use_cache, cu_seqlens=cu_seqlens)
        loss, logits = lm_head_and_loss(self, out.last_hidden_state, self.lm_head, labels, input_ids, return_logits)
        return CausalLMOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state, cache=out.cache)

    @property
    def position_limits(self):
        return position_limits(self.config)

    def generate(self, input_ids, max_new_tokens: int = 20, **kwargs):
        """Continue each prompt; returns (B, prompt_len + new) token ids. See generation.generate."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)


class LlamaForSequenceClassification(PreTrainedModel):
    """LlamaModel + a linear scorer at each row's last real token, as GPTForSequenceClassification
    (base.last_token_classification). labels (B,) class ids."""

    family = "llama"
    default_norm_position = "pre"
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        config = self.config
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.init_weights(self.score)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        h = self.model(input_ids, attention_mask, position_ids).last_hidden_state
        return last_token_classification(self, h, self.score, input_ids, attention_mask, labels)


__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
           "RotaryEmbedding", "apply_rotary", "rope_inv_freq", "MODEL_TYPES"]
