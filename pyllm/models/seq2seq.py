"""Encoder-decoder Transformers (BART / Marian / T5 layouts) on pyllm's fused attention and norms.

One configuration (`Seq2SeqConfig`) and one set of layers serve the three Hugging Face families; the
family (`model_type`) fills in what differs:

| | bart | marian | t5 |
| --- | --- | --- | --- |
| positions | learned (offset 2) | sinusoidal | relative bias (layer 0, shared by all layers) |
| norm | LayerNorm, post-norm | LayerNorm, post-norm | RMS "T5 LayerNorm", pre-norm + final norm |
| embedding | LayerNorm after, scale optional | x sqrt(d_model) | plain |
| attention | q.k / sqrt(head_dim), biases | same | q.k unscaled, no biases |
| head | tied, + final_logits_bias | same | tied, decoder output x d_model**-0.5 |

Every attention call is `pyllm.attention`: the encoder's self-attention masks padding, the decoder's is
causal (bottom-right aligned, so one new query against a KV cache just works), and cross-attention is
non-causal with Nq != Nk and the encoder's padding mask. T5's relative position bias goes through
`biased_attention` (one function, below). Shapes: B batch, M source length, N target length, C d_model,
H heads, D head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pyllm
from pyllm.nn import LayerNorm, Linear, RMSNorm
from pyllm.nn.linear import linear

from ..ops import linear_cross_entropy
from .base import ModelOutput, PreTrainedModel, check_class_labels, check_inputs, check_labels, padding_mask
from .block import activation_fn
from .config import ACTIVATIONS, BACKENDS
from .seq2seq_generation import Seq2SeqCache  # the decoding state (re-exported here)

MODEL_TYPES = ("bart", "marian", "t5")
POSITIONS = ("learned", "sinusoidal", "relative")
LEARNED_POSITION_OFFSET = 2  # BART's learned table starts at row 2 (a fairseq legacy)


@dataclass
class Seq2SeqConfig:
    """Hyperparameters of an encoder-decoder. Fields left None take the family's value (table above)."""

    model_type: str = "bart"
    vocab_size: int = 50265
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_heads: int = 12
    head_dim: Optional[int] = None  # None = d_model // num_heads (T5's d_kv may differ)
    ffn_dim: int = 3072
    activation: str = "gelu"
    gated_ffn: bool = False  # T5 v1.1: act(wi_0 x) * wi_1 x
    max_position_embeddings: int = 1024  # learned / sinusoidal table size; relative: unused
    position: Optional[str] = None
    norm: Optional[str] = None  # "layer" | "rms"
    norm_position: Optional[str] = None  # "post" | "pre"
    norm_eps: Optional[float] = None
    layernorm_embedding: Optional[bool] = None
    scale_embedding: Optional[bool] = None
    scale_attention: Optional[bool] = None
    bias: Optional[bool] = None  # biases in the attention and FFN linears
    final_logits_bias: Optional[bool] = None
    scale_decoder_outputs: Optional[bool] = None
    tie_word_embeddings: bool = True
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.1  # after embeddings, attention outputs and FFN outputs
    activation_dropout: float = 0.0  # inside the FFN, after the activation
    attention_dropout: float = 0.0  # recorded only: the fused kernel never forms the probabilities
    init_std: float = 0.02
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    decoder_start_token_id: Optional[int] = 2
    backend: Optional[str] = None
    generation: dict = field(default_factory=dict, repr=False)  # generation_config.json defaults

    def __post_init__(self):
        who = "Seq2SeqConfig"
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"{who}: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        t5, marian = self.model_type == "t5", self.model_type == "marian"
        defaults = dict(position="relative" if t5 else "sinusoidal" if marian else "learned",
                        norm="rms" if t5 else "layer", norm_position="pre" if t5 else "post",
                        norm_eps=1e-6 if t5 else 1e-5, layernorm_embedding=self.model_type == "bart",
                        scale_embedding=marian, scale_attention=not t5, bias=not t5, final_logits_bias=not t5,
                        scale_decoder_outputs=t5 and self.tie_word_embeddings)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"{who}: d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) "
                                 f"unless head_dim is given")
            self.head_dim = self.d_model // self.num_heads
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "num_heads", "head_dim",
                     "ffn_dim", "max_position_embeddings", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
        for name, allowed in (("position", POSITIONS), ("norm", ("layer", "rms")),
                              ("norm_position", ("pre", "post")), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{who}: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"{who}: sinusoidal positions need an even d_model, got {self.d_model}")
        for name in ("dropout", "activation_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{who}: {name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"{who}: norm_eps must be > 0, got {self.norm_eps!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"{who}: backend must be None or one of {BACKENDS}, got {self.backend!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            tid = getattr(self, name)
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ValueError(f"{who}: {name} must be in [0, vocab_size={self.vocab_size}), got {tid}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Seq2SeqConfig":
        return Seq2SeqConfig(**{**self.to_dict(), **changes})


@dataclass
class Seq2SeqModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, N, C) decoder output
    encoder_last_hidden_state: torch.Tensor = None  # (B, M, C)
    cache: Optional["Seq2SeqCache"] = None


@dataclass
class Seq2SeqLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, N, vocab)
    encoder_last_hidden_state: torch.Tensor = None  # (B, M, C)
    cache: Optional["Seq2SeqCache"] = None


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """labels (B, N) -> decoder_input_ids (B, N): start token, then labels[:, :-1]; -100 becomes pad."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError("shift_tokens_right: the config needs decoder_start_token_id and pad_token_id to build "
                         "decoder_input_ids from labels")
    out = labels.new_full(labels.shape, decoder_start_token_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, pad_token_id)


# ----------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=None)
def _fused_bias_supported() -> bool:
    """Whether pyllm.attention takes `attn_bias` (added by the attention issue; then T5 runs fully fused)."""
    return "attn_bias" in inspect.signature(pyllm.attention).parameters


def biased_attention(q, k, v, attn_bias, *, causal: bool, key_padding_mask, softmax_scale: float, backend):
    """Attention with an additive score bias (T5's relative positions), gradient to the bias included.

    q (B, Nq, H, D); k, v (B, Nk, H, D); attn_bias (1 or B, H, Nq, Nk); key_padding_mask (B, Nk) bool.
    Uses `pyllm.attention(..., attn_bias=)` when pyllm provides it; until then plain PyTorch in fp32 with
    the same conventions (bottom-right causal, rows that see no key give zeros). This is the only place
    seq2seq attention leaves the fused kernel.
    """
    if _fused_bias_supported():
        return pyllm.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
                               attn_bias=attn_bias, backend=backend)
    Nq, Nk = q.shape[1], k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale + attn_bias.float()  # (B, H, Nq, Nk)
    visible = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(Nk - Nq)
    visible = visible.expand(q.shape[0], 1, Nq, Nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    p = s.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # empty rows: 0, not NaN
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype)  # (B, Nq, H, D)


@dataclass
class PackedTokens:
    """The real tokens of a right- or left-padded batch laid end to end: how the encoder of a padded batch
    skips its padding (every linear, norm and attention runs on the T real tokens only; rows that are padding
    carry nothing any output reads). index (T,): their positions in the flattened (B * M) batch; cu_seqlens
    (B + 1,) int32 and max_len: pyllm.attention_varlen's."""

    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> Optional["PackedTokens"]:
        """From a (B, M) bool mask (True = real); None when nothing is padding."""
        if bool(mask.all()):
            return None
        lengths = mask.sum(1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(mask.flatten().nonzero().squeeze(1), cu, int(lengths.max()))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M, C) -> (1, T, C)."""
        return x.flatten(0, 1).index_select(0, self.index)[None]

    def unpack(self, x: torch.Tensor, B: int, M: int) -> torch.Tensor:
        """(1, T, C) -> (B, M, C), zeros at the padding."""
        return x.new_zeros(B * M, x.shape[-1]).index_copy(0, self.index, x[0]).view(B, M, x.shape[-1])


class Attention(nn.Module):
    """Self-attention (q, k, v from one matmul) or cross-attention (q from the decoder, k and v in one
    matmul from the encoder output). Parameters: `qkv` or `q` + `kv`, and the output projection `o`."""

    def __init__(self, config: Seq2SeqConfig, cross: bool):
        super().__init__()
        self.cross, self.backend = cross, config.backend
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scale = config.head_dim ** -0.5 if config.scale_attention else 1.0
        C, inner, bias = config.d_model, config.inner_dim, config.bias
        if cross:
            self.q = Linear(C, inner, bias=bias, backend=config.backend)
            self.kv = Linear(C, 2 * inner, bias=bias, backend=config.backend)
        else:
            self.qkv = Linear(C, 3 * inner, bias=bias, backend=config.backend)
        self.o = Linear(inner, C, bias=bias, backend=config.backend)

    def forward(self, x, key_padding_mask=None, causal=False, cache: Optional[Seq2SeqCache] = None,
                layer_idx: int = 0, memory=None, position_bias=None):
        # x (B, N, C); memory (B, M, C) for cross-attention; key_padding_mask (B, keys) bool or None
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        if self.cross:
            # memory may hold one row per G decoder rows (beam search: the beams of a source read it once); the
            # G rows' queries then attend as G * N queries of that row (cross-attention is not causal)
            S = memory.shape[0]
            q = self.q(x).view(S, (B // S) * N, H, D)
            if cache is not None and cache.cross[layer_idx] is not None:
                k, v = cache.cross[layer_idx]
            else:
                k, v = self.kv(memory).view(S, memory.shape[1], 2, H, D).unbind(2)  # (S, M, H, D) views
                if cache is not None:
                    cache.cross[layer_idx] = (k, v)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, H, D).unbind(2)  # (B, N, H, D) views, last dim contiguous
            if cache is not None:
                k, v = cache.self_attn.update(layer_idx, k, v)  # (B, past + N, H, D)
        if isinstance(key_padding_mask, PackedTokens):  # x is (1, T, C): the real tokens of a padded batch
            p = key_padding_mask
            o = pyllm.attention_varlen(q[0], k[0], v[0], p.cu_seqlens, p.cu_seqlens, p.max_len, p.max_len,
                                       causal=causal, softmax_scale=self.scale, backend=self.backend)
        elif position_bias is None:
            o = pyllm.attention(q, k, v, causal=causal, softmax_scale=self.scale, key_padding_mask=key_padding_mask,
                                backend=self.backend)
        else:
            o = biased_attention(q, k, v, position_bias, causal=causal, key_padding_mask=key_padding_mask,
                                 softmax_scale=self.scale, backend=self.backend)
        return self.o(o.reshape(B, N, H * D))  # (B, N, C)


class FeedForward(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        C, F_, bias = config.d_model, config.ffn_dim, config.bias
        self.fc1 = Linear(C, F_, bias=bias, backend=config.backend)
        self.gate = Linear(C, F_, bias=bias, backend=config.backend) if config.gated_ffn else None
        self.fc2 = Linear(F_, C, bias=bias, backend=config.backend)
        self.act = activation_fn(config.activation)
        self.dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x):
        h = self.act(self.fc1(x))  # (B, N, ffn_dim)
        if self.gate is not None:
            h = h * self.gate(x)
        return self.fc2(self.dropout(h))  # (B, N, C)


def make_norm(config: Seq2SeqConfig):
    if config.norm == "rms":
        return RMSNorm(config.d_model, eps=config.norm_eps, backend=config.backend)
    return LayerNorm(config.d_model, eps=config.norm_eps, backend=config.backend)


class Seq2SeqLayer(nn.Module):
    """One encoder layer (self-attention, FFN) or decoder layer (causal self-attention, cross-attention,
    FFN), each sublayer with a residual and a norm.

    post-norm (BART): x = norm(x + sublayer(x)) per sublayer, the add fused into the norm; returns (x, None).
    pre-norm (T5): takes and returns (hidden, residual) with the residual add deferred into the next norm,
    as pyllm's GPT blocks do: normed, residual = norm(hidden, residual=residual); hidden = sublayer(normed).
    """

    def __init__(self, config: Seq2SeqConfig, decoder: bool):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = Attention(config, cross=False)
        self.norm1 = make_norm(config)
        self.cross_attn = Attention(config, cross=True) if decoder else None
        self.norm_cross = make_norm(config) if decoder else None
        self.ffn = FeedForward(config)
        self.norm2 = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def _sublayers(self):
        yield self.norm1, lambda h, a: self.self_attn(h, a["mask"], a["causal"], a["cache"], a["layer"],
                                                      position_bias=a["bias"])
        if self.cross_attn is not None:
            yield self.norm_cross, lambda h, a: self.cross_attn(h, a["memory_mask"], False, a["cache"], a["layer"],
                                                                memory=a["memory"])
        yield self.norm2, lambda h, a: self.ffn(h)

    def forward(self, x, residual=None, mask=None, causal=False, cache=None, layer=0, bias=None, memory=None,
                memory_mask=None):
        args = dict(mask=mask, causal=causal, cache=cache, layer=layer, bias=bias, memory=memory,
                    memory_mask=memory_mask)
        for norm, sublayer in self._sublayers():
            if self.pre_norm:
                if residual is None:
                    residual, normed = x, norm(x)
                else:
                    normed, residual = norm(x, residual=residual)  # residual = x + residual, still un-normed
                x = self.dropout(sublayer(normed, args))
            else:
                x, _ = norm(self.dropout(sublayer(x, args)), residual=x)  # norm(x + sublayer(x))
        return x, residual


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """Marian's table (num_positions, dim): sin in the first half of the features, cos in the second,
    both at frequencies 10000 ** (-2i / dim)."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-2.0 * torch.arange(dim // 2, dtype=torch.float64) / dim)
    angle = pos * inv  # (num_positions, dim // 2)
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's buckets: exact for small distances, log-spaced up to max_distance, separate signs if bidirectional."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class Seq2SeqStack(nn.Module):
    """The encoder (decoder=False) or the decoder: embeddings (+ positions), layers, final norm if pre-norm."""

    def __init__(self, config: Seq2SeqConfig, embed_tokens: nn.Embedding, decoder: bool):
        super().__init__()
        self.config, self.decoder = config, decoder
        self.embed_tokens = embed_tokens  # shared with the other stack (and the LM head)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_positions = None
        self.relative_attention_bias = None
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings + LEARNED_POSITION_OFFSET,
                                                config.d_model)
        elif config.position == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(config.max_position_embeddings, config.d_model),
                                 persistent=False)
        else:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layernorm_embedding = make_norm(config) if config.layernorm_embedding else None
        self.layers = nn.ModuleList(Seq2SeqLayer(config, decoder)
                                    for _ in range(config.decoder_layers if decoder else config.encoder_layers))
        self.norm_f = make_norm(config) if config.norm_position == "pre" else None
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False

    def position_bias(self, Nq: int, Nk: int, past: int, device) -> torch.Tensor:
        """(1, H, Nq, Nk) T5 bias for queries at positions past..past+Nq-1 against keys 0..Nk-1."""
        cfg = self.config
        rel = torch.arange(Nk, device=device)[None, :] - torch.arange(past, past + Nq, device=device)[:, None]
        buckets = relative_position_bucket(rel, not self.decoder, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)  # (Nq, Nk)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, input_ids, mask=None, cache: Optional[Seq2SeqCache] = None, memory=None, memory_mask=None,
                embeds=None):
        # input_ids (B, N); mask (B, past + N) bool or None; memory (B, M, C), memory_mask (B, M) for the decoder;
        # embeds (B, N, C): embed_tokens(input_ids) when the caller looked them up already
        B, N = input_ids.shape
        past = cache.seq_len if cache is not None else 0
        x = self.embed_tokens(input_ids) if embeds is None else embeds  # (B, N, C)
        if self.embed_scale != 1.0:  # BART's default: no scaling, and no pass over x for it
            x = x * self.embed_scale
        if self.embed_positions is not None:
            x = x + self.embed_positions.weight[LEARNED_POSITION_OFFSET + past:LEARNED_POSITION_OFFSET + past + N]
        elif self.relative_attention_bias is None:
            x = x + self.sinusoidal[past:past + N].to(x.dtype)
        bias = (self.position_bias(N, past + N, past, x.device) if self.relative_attention_bias is not None
                else None)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout(x)
        packed = None
        if not self.decoder and bias is None and mask is not None:  # skip the padding of a padded source batch
            packed = PackedTokens.of(mask)
            if packed is not None:
                x, mask = packed.pack(x), packed  # (1, T, C)
        residual = None
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            args = (x, residual, mask, self.decoder, cache, i, bias, memory, memory_mask)
            # checkpointing keeps only each layer's inputs alive and recomputes the rest in backward
            x, residual = checkpoint(layer, *args, use_reentrant=False) if ckpt else layer(*args)
        if self.norm_f is not None:
            x = self.norm_f(x) if residual is None else self.norm_f(x, residual=residual)[0]
            x = self.dropout(x)
        return x if packed is None else packed.unpack(x, B, N)  # (B, N, C)


# ----------------------------------------------------------------------------- models


def _check_ids(config: Seq2SeqConfig, ids, mask, who: str, name: str, past: int = 0):
    """check_inputs for one side (encoder or decoder); errors name `name` (input_ids / decoder_input_ids)."""
    limit = config.max_position_embeddings if config.position != "relative" else 1 << 62
    view = SimpleNamespace(vocab_size=config.vocab_size, max_position_embeddings=limit)
    try:
        return check_inputs(view, ids, mask, past_len=past, who=who)
    except ValueError as e:
        if name == "input_ids":
            raise
        msg = str(e).replace("attention_mask", "decoder_attention_mask").replace("input_ids", name)
        raise ValueError(msg.replace("decoder_decoder_", "decoder_")) from None


def _encoder_states(encoder_outputs):
    if isinstance(encoder_outputs, torch.Tensor):
        return encoder_outputs
    if isinstance(encoder_outputs, (tuple, list)):
        return encoder_outputs[0]
    return encoder_outputs.last_hidden_state


class Seq2SeqPreTrainedModel(PreTrainedModel):
    """Base of the encoder-decoders: config, weight init, Hugging Face checkpoints (seq2seq_io.py); device,
    dtype and num_parameters() come from pyllm's PreTrainedModel."""

    families: tuple = ()  # the model_type values this class reads and writes
    config_class = Seq2SeqConfig  # what from_pretrained builds from config.json

    def __init__(self, config: Seq2SeqConfig):
        nn.Module.__init__(self)  # PreTrainedModel.__init__ takes a TransformerConfig
        who = type(self).__name__
        if not isinstance(config, Seq2SeqConfig):
            raise ValueError(f"{who}: config must be a Seq2SeqConfig, got {type(config).__name__}")
        if config.model_type not in self.families:
            raise ValueError(f"{who}: config.model_type is {config.model_type!r}; {who} takes model types "
                             f"{self.families}")
        self.config = config
        self.generation_config: dict = dict(config.generation)

    def init_weights(self, *roots: nn.Module):
        """Normal(0, init_std) matrices and embeddings, zero biases, unit norms (transformers' BART init)."""
        std = self.config.init_std
        for module in (m for root in (roots or (self,)) for m in root.modules()):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, Seq2SeqStack))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        """Recompute each layer in the backward pass (torch.utils.checkpoint), encoder and decoder."""
        for m in self.modules():
            if isinstance(m, Seq2SeqStack):
                m.gradient_checkpointing = bool(on)

    @classmethod
    def from_pretrained(cls, folder, *, dtype: Optional[torch.dtype] = None, **overrides):
        """Read a Hugging Face folder (config.json, model.safetensors, generation_config.json if present).
        `overrides` replace Seq2SeqConfig fields (e.g. dropout=0.0, backend="reference")."""
        from .seq2seq_io import load_pretrained
        return load_pretrained(cls, folder, dtype=dtype, **overrides)

    def save_pretrained(self, folder, *, overwrite: bool = False, max_shard_size=None):
        """Write config.json, generation_config.json and model.safetensors as transformers lays them out
        (sharded past max_shard_size, as PreTrainedModel.save_pretrained)."""
        from .seq2seq_io import save_pretrained
        save_pretrained(self, folder, overwrite=overwrite, max_shard_size=max_shard_size)


class EncoderDecoderModel(Seq2SeqPreTrainedModel):
    """Shared token embedding -> encoder; decoder attending to the encoder output. No LM head.

    forward(input_ids (B, M), attention_mask (B, M), decoder_input_ids (B, N), decoder_attention_mask
    (B, past + N), encoder_outputs (B, M, C) instead of input_ids, cache) -> Seq2SeqModelOutput with
    last_hidden_state (B, N, C) and encoder_last_hidden_state (B, M, C).
    """

    def __init__(self, config: Seq2SeqConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Seq2SeqStack(config, self.shared, decoder=False)
        self.decoder = Seq2SeqStack(config, self.shared, decoder=True)
        self.init_weights()

    def encode(self, input_ids, attention_mask=None, *, embeds=None) -> torch.Tensor:
        """(B, M) ids and mask -> encoder output (B, M, C). embeds: shared(input_ids) if already looked up."""
        _check_ids(self.config, input_ids, attention_mask, type(self).__name__, "input_ids")
        return self.encoder(input_ids, padding_mask(attention_mask), embeds=embeds)

    def decode(self, decoder_input_ids, memory, attention_mask=None, decoder_attention_mask=None,
               cache: Optional[Seq2SeqCache] = None, *, embeds=None) -> torch.Tensor:
        """Decoder output (B, N, C) for decoder_input_ids (B, N) after `cache.seq_len` cached positions,
        attending to memory (S, M, C) where attention_mask (S, M) is 1. S is B, or a divisor of it: then decoder
        rows s*B/S ... (s+1)*B/S - 1 read source s (the beams of one source share its encoder output)."""
        past = cache.seq_len if cache is not None else 0
        B, _ = _check_ids(self.config, decoder_input_ids, decoder_attention_mask, type(self).__name__,
                          "decoder_input_ids", past)
        if (memory.dim() != 3 or not memory.shape[0] or B % memory.shape[0] or
                memory.shape[2] != self.config.d_model):
            raise ValueError(f"{type(self).__name__}: encoder output must have shape (batch={B} or a divisor of it, "
                             f"source length, d_model={self.config.d_model}), got {tuple(memory.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(memory.shape[:2]):
            raise ValueError(f"{type(self).__name__}: attention_mask must have shape {tuple(memory.shape[:2])} "
                             f"(batch, source length), got {tuple(attention_mask.shape)}")
        return self.decoder(decoder_input_ids, padding_mask(decoder_attention_mask), cache, memory,
                            padding_mask(attention_mask), embeds=embeds)

    def default_decoder_input_ids(self, input_ids, who: str):
        raise ValueError(f"{who}: pass decoder_input_ids or labels (the decoder needs its own inputs)")

    def _embed_both(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        """shared(input_ids) (B, M, C) and shared(decoder_input_ids) (B, N, C) from one lookup: in training the
        shared table then gets one (vocab, C) gradient from the embeddings instead of two (each a zero-filled
        (vocab, C) tensor, then summed). The ids are checked first, as encode() and decode() check them."""
        who = type(self).__name__
        _check_ids(self.config, input_ids, attention_mask, who, "input_ids")
        _check_ids(self.config, decoder_input_ids, decoder_attention_mask, who, "decoder_input_ids")
        e = self.shared(torch.cat([input_ids.flatten(), decoder_input_ids.flatten()]))  # (B * M + B * N, C)
        src, tgt = e.split([input_ids.numel(), decoder_input_ids.numel()])
        return src.view(*input_ids.shape, -1), tgt.view(*decoder_input_ids.shape, -1)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache: Optional[Seq2SeqCache] = None, use_cache: bool = False):
        who = type(self).__name__
        if encoder_outputs is None and input_ids is None:
            raise ValueError(f"{who}: pass input_ids (or encoder_outputs)")
        if decoder_input_ids is None:
            decoder_input_ids = self.default_decoder_input_ids(input_ids, who)
        src = tgt = None
        if encoder_outputs is None and cache is None and not use_cache:
            src, tgt = self._embed_both(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        memory = self.encode(input_ids, attention_mask, embeds=src) if encoder_outputs is None else \
            _encoder_states(encoder_outputs)
        if use_cache and cache is None:
            cache = Seq2SeqCache(self.config.decoder_layers)
        h = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask, cache, embeds=tgt)
        return Seq2SeqModelOutput(last_hidden_state=h, encoder_last_hidden_state=memory, cache=cache)


class Seq2SeqLM(Seq2SeqPreTrainedModel):
    """An EncoderDecoderModel (`self.model`) plus the LM head tied to the shared embedding.

    labels (B, N): the target ids, -100 = ignored; decoder_input_ids default to labels shifted right
    behind decoder_start_token_id. Returns Seq2SeqLMOutput(loss, logits (B, N, vocab),
    encoder_last_hidden_state (B, M, C), cache). While training (``model.train()``) with labels, the loss
    comes from ``pyllm.linear_cross_entropy`` (LM head, final_logits_bias and cross-entropy in one pass, by
    chunks) and the (B, N, vocab) logits are not formed: ``logits`` is None unless ``return_logits=True``.
    In eval mode, or without labels, logits are returned as usual.
    """

    base_class = EncoderDecoderModel

    def __init__(self, config: Seq2SeqConfig):
        super().__init__(config)
        self.model = self.base_class(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False, backend=config.backend)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.shared.weight
        else:
            self.init_weights(self.lm_head)
        if config.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        else:
            self.final_logits_bias = None

    def _head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, N, C) -> logits (B, N, vocab)."""
        bias = None if self.final_logits_bias is None else self.final_logits_bias[0]
        return linear(self._head_input(hidden), self.lm_head.weight, bias, self.config.backend)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None, cache: Optional[Seq2SeqCache] = None, use_cache: bool = False,
                return_logits: Optional[bool] = None):
        who = type(self).__name__
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
                raise ValueError(f"{who}: labels must be a (batch, target length) tensor, got "
                                 f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
            if decoder_input_ids is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                       self.config.decoder_start_token_id)
            check_labels(labels, decoder_input_ids.shape, who)
            check_class_labels(labels, self.config.vocab_size, who)
        out = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                         cache, use_cache)
        if return_logits is None:
            return_logits = labels is None or not self.training
        h = out.last_hidden_state  # (B, N, C)
        logits = self.logits(h) if return_logits else None  # (B, N, vocab)
        loss = None
        if labels is not None and logits is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        elif labels is not None:
            bias = None if self.final_logits_bias is None else self.final_logits_bias[0]
            loss = linear_cross_entropy(self._head_input(h), self.lm_head.weight, labels, bias=bias,
                                        backend=self.config.backend)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=out.encoder_last_hidden_state,
                               cache=out.cache)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Translate / summarize: (B, M) source ids -> (B, 1 + new) target ids starting with the decoder
        start token. Greedy, sampling or beam search; see seq2seq_generation.generate for the arguments;
        defaults come from `self.generation_config` (the folder's generation_config.json)."""
        from .seq2seq_generation import generate
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)
