"""The Transformer block shared by both families, the layer stack, and the KV cache.

Attention goes through `pyllm.attention` (no seqlen x seqlen tensor is ever formed) and every
LayerNorm is a `pyllm.nn.LayerNorm`. Pre-norm blocks carry (hidden, residual) pairs so each
residual add is fused into the next norm: `norm(x, residual=r)` returns `(norm(x + r), x + r)`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import pyllm
from pyllm.nn import LayerNorm, Linear, RMSNorm
from pyllm.nn.linear import decode_min_rows, decode_rows
from pyllm.ops import decode_stack

from .config import TransformerConfig


def gelu_tanh(x):
    """GPT-2's tanh approximation of GELU, fused (pyllm.gelu)."""
    return pyllm.gelu(x, "tanh")


# activation name -> function; StackPlan reads the MLP's function back to the name its C++ step computes
_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": gelu_tanh, "gelu_tanh": gelu_tanh, "relu": F.relu, "silu": F.silu}
_ACTIVATION_NAMES = {F.gelu: "gelu", gelu_tanh: "gelu_tanh", F.relu: "relu", F.silu: "silu"}


def activation_fn(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: unknown name {name!r}")
    return _ACTIVATIONS[name]


class KVCache:
    """Keys and values of past positions, per layer, for incremental decoding.

    Storage is (B, capacity, Hkv, D) per layer and grows by doubling, so appending one token is
    O(1) amortized; attention reads the filled prefix as a strided view (no copy).
    """

    def __init__(self, num_layers: int, capacity: int = 0):
        self.k: list[Optional[torch.Tensor]] = [None] * num_layers
        self.v: list[Optional[torch.Tensor]] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.capacity = capacity
        self.write_at: Optional[torch.Tensor] = None  # static mode (freeze)

    def freeze(self, write_at: torch.Tensor) -> None:
        """Static shapes, for a compiled decode step: from now on update() writes its one token per row at
        column ``write_at`` (a (1,) int64 tensor the caller advances in place) and returns the whole buffers
        (B, capacity, Hkv, D), so every step has the same shapes. The caller's key padding mask
        (B, capacity) must hide the columns not written yet. Needs buffers filled up to capacity's size."""
        if any(k is None or k.shape[1] < self.capacity for k in self.k):
            raise ValueError(f"KVCache.freeze: every layer needs a buffer of capacity {self.capacity} first "
                             f"(fill it once, e.g. with the prompt)")
        for layer, end in enumerate(self.lengths):  # masked columns must hold numbers (0 * NaN would be NaN)
            self.k[layer][:, end:].zero_()
            self.v[layer][:, end:].zero_()
        self.write_at = write_at

    @property
    def seq_len(self) -> int:
        """Number of positions already cached (as seen by layer 0)."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, N, Hkv, D) for `layer`; return all cached k, v (B, past + N, Hkv, D)
        (frozen: write N=1 at column write_at, return the whole buffers (B, capacity, Hkv, D))."""
        if self.write_at is not None:
            self.k[layer].index_copy_(1, self.write_at, k)
            self.v[layer].index_copy_(1, self.write_at, v)
            return self.k[layer], self.v[layer]
        B, N, H, D = k.shape
        start = self.lengths[layer]
        end = start + N
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or buf_k.shape[1] < end:
            cap = max(end, self.capacity, 2 * (buf_k.shape[1] if buf_k is not None else 0))
            new_k = k.new_empty(B, cap, H, D)
            new_v = v.new_empty(B, cap, H, D)
            if start:
                new_k[:, :start] = buf_k[:, :start]
                new_v[:, :start] = buf_v[:, :start]
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        # narrow + copy_: the cheapest way to write and view (a decode step makes one call per layer)
        buf_k.narrow(1, start, N).copy_(k)
        buf_v.narrow(1, start, N).copy_(v)
        self.lengths[layer] = end
        return buf_k.narrow(1, 0, end), buf_v.narrow(1, 0, end)


class PackedSequences(NamedTuple):
    """Documents packed end to end without padding (FlashAttention's varlen layout): document d is tokens
    cu_seqlens[d]:cu_seqlens[d+1] of the flattened (batch * seqlen) input; attention never crosses documents.
    The models carry it to their attention layers in the key-padding-mask slot."""

    cu_seqlens: torch.Tensor  # (documents + 1,) int32, from 0 to batch * seqlen
    max_seqlen: int


def packed_sequences(cu_seqlens, input_ids, attention_mask, cache, who: str) -> PackedSequences:
    """Validate ``cu_seqlens`` for a packed (B, N) input_ids; returns the PackedSequences the blocks take."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) \
            else type(cu_seqlens).__name__
        raise TypeError(f"{who}: cu_seqlens must be a 1-D int32 tensor (documents + 1,), got {got}")
    if attention_mask is not None or cache is not None:
        raise ValueError(f"{who}: cu_seqlens (packed documents) excludes attention_mask and cache")
    c = cu_seqlens.tolist()
    if not c or c[0] != 0 or c[-1] != input_ids.numel() or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"{who}: cu_seqlens must rise from 0 to the {input_ids.numel()} tokens of input_ids "
                         f"{tuple(input_ids.shape)}, got {c if len(c) <= 16 else c[:8] + ['...'] + c[-4:]}")
    return PackedSequences(cu_seqlens, max((b - a for a, b in zip(c, c[1:])), default=0))


def packed_positions(cu_seqlens: torch.Tensor, shape) -> torch.Tensor:
    """Positions that restart at 0 at every document start: (B, N) for packed input_ids of ``shape``."""
    lens = cu_seqlens.diff().long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    return (torch.arange(starts.numel(), device=cu_seqlens.device) - starts).view(shape)


def packed_attention(q, k, v, packed: PackedSequences, **kwargs):
    """pyllm.attention_varlen over (B, N, H, D) views of packed documents -> (B, N, Hq, D)."""
    B, N = q.shape[:2]
    cu, mx = packed
    o = pyllm.attention_varlen(q.reshape(B * N, *q.shape[2:]), k.reshape(B * N, *k.shape[2:]),
                               v.reshape(B * N, *v.shape[2:]), cu, cu, mx, mx, **kwargs)
    return o.view(B, N, *o.shape[1:])


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig, causal: bool):
        super().__init__()
        self.causal = causal
        self.backend = config.backend
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v in one matmul; GQA makes the k and v parts narrower
        self.qkv = Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                          backend=config.backend)
        self.proj = Linear(config.hidden_size, config.hidden_size, backend=config.backend)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.attention_dropout = config.attention_dropout

    def forward(self, x, key_padding_mask=None, cache: Optional[KVCache] = None, layer_idx: int = 0):
        B, N, C = x.shape
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([hq, hkv, hkv], dim=-1)
        # views, not copies: pyllm.attention only needs the last dim contiguous
        q = q.view(B, N, self.num_heads, self.head_dim)  # (B, N, Hq, D)
        k = k.view(B, N, self.num_kv_heads, self.head_dim)  # (B, N, Hkv, D)
        v = v.view(B, N, self.num_kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, past + N, Hkv, D)
        # causal is bottom-right aligned, so N new queries against past + N keys just work
        p = self.attention_dropout if self.training else 0.0  # dropped inside the fused kernel
        if isinstance(key_padding_mask, PackedSequences):  # documents packed without padding: one varlen call
            o = packed_attention(q, k, v, key_padding_mask, causal=self.causal, dropout_p=p, backend=self.backend)
        else:
            o = pyllm.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, dropout_p=p,
                                backend=self.backend)  # (B, N, Hq, D)
        return self.dropout(self.proj(o.reshape(B, N, C)))

    direct_decode = True

    def decode(self, x, key_padding_mask, cache: KVCache, layer_idx: int):
        """forward in eval mode for generate()'s decode loop, the submodules' forward called directly
        (direct_decode_ok checked once that this is exact). Mirrors forward: keep the two in step."""
        B, N, C = x.shape
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv.forward(x).split_with_sizes([hq, hkv, hkv], dim=-1)
        k, v = cache.update(layer_idx, k.view(B, N, self.num_kv_heads, self.head_dim),
                            v.view(B, N, self.num_kv_heads, self.head_dim))
        o = pyllm.attention(q.view(B, N, self.num_heads, self.head_dim), k, v, causal=self.causal,
                            key_padding_mask=key_padding_mask, backend=self.backend)
        return self.proj.forward(o.reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, backend=config.backend)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, backend=config.backend)
        self.act = activation_fn(config.activation)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.act(self.fc1(x))))  # (B, N, C)

    direct_decode = True

    def decode(self, x):
        """forward in eval mode, the Linear layers' forward called directly (see SelfAttention.decode)."""
        return self.fc2.forward(self.act(self.fc1.forward(x)))


class Block(nn.Module):
    """attention + MLP, each with a residual connection and a LayerNorm.

    post-norm (BERT):  x = norm1(x + attn(x));  x = norm2(x + mlp(x));  forward returns (x, None)
    pre-norm (GPT):    takes and returns (hidden, residual) with the residual add deferred, so
                       each add is fused into the following norm (the next block's norm1, or the
                       model's final norm):  r = hidden + r;  h = attn(norm1(r));  r = h + r;
                       hidden = mlp(norm2(r)).  The first block gets residual=None.
    """

    def __init__(self, config: TransformerConfig, causal: bool, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = LayerNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
        self.attn = SelfAttention(config, causal)
        self.norm2 = LayerNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
        self.mlp = MLP(config)

    def forward(self, x, residual=None, key_padding_mask=None, cache=None, layer_idx=0):
        # x, residual: (B, N, C); key_padding_mask: (B, past + N) bool or None
        if not self.pre_norm:
            a = self.attn(x, key_padding_mask, cache, layer_idx)  # (B, N, C)
            x, _ = self.norm1(a, residual=x)  # norm(x + attn(x))
            x, _ = self.norm2(self.mlp(x), residual=x)
            return x, None
        if residual is None:
            residual, normed = x, self.norm1(x)
        else:
            normed, residual = self.norm1(x, residual=residual)
        a = self.attn(normed, key_padding_mask, cache, layer_idx)
        normed, residual = self.norm2(a, residual=residual)  # residual = x + attn, still un-normed
        return self.mlp(normed), residual  # (B, N, C) each

    direct_decode = True

    def decode(self, x, residual, key_padding_mask, cache: KVCache, layer_idx: int):
        """forward of a pre-norm block in eval mode, its submodules' forward called directly (see
        SelfAttention.decode). Mirrors forward: keep the two in step."""
        if residual is None:
            residual, normed = x, self.norm1.forward(x)
        else:
            normed, residual = self.norm1.forward(x, residual=residual)
        a = self.attn.decode(normed, key_padding_mask, cache, layer_idx)
        normed, residual = self.norm2.forward(a, residual=residual)
        return self.mlp.decode(normed), residual


class BlockStack(nn.Module):
    """The stack of blocks (plus the final norm when pre-norm), with optional per-block checkpointing:
    BERT's encoder and GPT's decoder layers alike."""

    def __init__(self, config: TransformerConfig, causal: bool, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.layers = nn.ModuleList(Block(config, causal, pre_norm) for _ in range(config.num_layers))
        self.norm_f = (LayerNorm(config.hidden_size, eps=config.norm_eps, backend=config.backend)
                       if pre_norm else None)
        self.gradient_checkpointing = False

    def forward(self, x, key_padding_mask=None, cache: Optional[KVCache] = None):
        residual = None
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if use_ckpt:
                # recompute the block in backward: activation memory is O(layers * B * N * C) of
                # block inputs only, instead of every intermediate
                x, residual = checkpoint(block, x, residual, key_padding_mask, None, i, use_reentrant=False)
            else:
                x, residual = block(x, residual, key_padding_mask, cache, i)
        if self.norm_f is not None:
            x = self.norm_f(x) if residual is None else self.norm_f(x, residual=residual)[0]
        return x  # (B, N, C)

    direct_decode = True

    def decode(self, x, key_padding_mask, cache: KVCache, plan: Optional[StackPlan] = None):
        """forward of a pre-norm stack in eval mode with a cache, the blocks' decode (see SelfAttention.decode);
        with a plan (decode_plan()), the whole step in one C++ call when it takes it."""
        if plan is not None:
            y = plan(x, key_padding_mask, cache)
            if y is not None:
                return y
        residual = None
        for i, block in enumerate(self.layers):
            x, residual = block.decode(x, residual, key_padding_mask, cache, i)
        return self.norm_f.forward(x, residual=residual)[0]  # (B, N, C)

    def decode_plan(self) -> Optional[StackPlan]:
        """The StackPlan of decode() (call after direct_decode_ok), or None where the C++ step cannot stand for
        the blocks' decode methods."""
        blocks = list(self.layers)
        if not self.pre_norm or not blocks:
            return None
        attn, mlp = blocks[0].attn, blocks[0].mlp
        act = _ACTIVATION_NAMES.get(mlp.act)
        if act is None or any(b.mlp.act is not mlp.act or b.attn.causal != attn.causal for b in blocks):
            return None
        layers = [(b.norm1.weight, b.norm1.bias, b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight,
                   b.attn.proj.bias, b.norm2.weight, b.norm2.bias, b.mlp.fc1.weight, b.mlp.fc1.bias,
                   b.mlp.fc2.weight, b.mlp.fc2.bias) for b in blocks]
        return StackPlan.build(self, layers, (self.norm_f.weight, self.norm_f.bias), LayerNorm, attn.num_heads,
                               attn.num_kv_heads, attn.head_dim, attn.causal, act, mlp.fc1.out_features)


class StackPlan:
    """generate()'s decode step of a pre-norm stack (GPT's blocks, Llama's) as one C++ call
    (:mod:`pyllm.ops.decode_stack`): the calls the blocks' decode methods make, in the same order with the same
    arguments (so the same bits, tested), without Python between the ~15 op calls of each block. The model's
    ``decode_plan()`` builds it once per generate() call, after ``direct_decode_ok``; a step the C++ side does
    not take (a cache buffer to grow, another backend in force, a dtype the cpu kernels do not serve) returns
    None having written nothing, and the caller runs the decode methods."""

    def __init__(self, layers, final_norm, spec):
        self.layers, self.final_norm, self.spec = layers, final_norm, spec

    @classmethod
    def build(cls, body: nn.Module, layers, final_norm, norm_cls, heads: int, kv_heads: int, head_dim: int,
              causal: bool, mlp: str, intermediate: int) -> Optional[StackPlan]:
        """layers: per block the 12 tensors (or None) of decode_stack_fast (csrc/small_calls.cpp); every norm
        of ``body`` must be a ``norm_cls`` over the hidden size with one eps; every op's backend auto or cpu."""
        if not decode_stack.available():
            return None
        norms = [m for m in body.modules() if isinstance(m, (LayerNorm, RMSNorm))]
        eps, shapes = {m.eps for m in norms}, {tuple(m.normalized_shape) for m in norms}
        if (len(eps) != 1 or len(shapes) != 1 or len(shapes.pop()) != 1 or any(type(m) is not norm_cls for m in norms)
                or any(getattr(m, "backend", None) not in decode_stack.BACKENDS for m in body.modules())):
            return None
        spec = (norm_cls is RMSNorm, eps.pop(), heads, kv_heads, head_dim, causal, mlp, intermediate,
                decode_rows(), decode_min_rows())
        return cls(tuple(layers), final_norm, spec)

    def __call__(self, x, key_padding_mask, cache: KVCache, cos=None, sin=None):
        """x (B, N, C) the embedded tokens -> the stack's output (B, N, C), or None (nothing written)."""
        lengths = cache.lengths
        start = lengths[0]
        if cache.write_at is not None or lengths.count(start) != len(lengths):
            return None
        y = decode_stack.decode_stack(x, self.layers, self.final_norm, cache.k, cache.v, start, key_padding_mask,
                                      cos, sin, self.spec)
        if y is not None:
            lengths[:] = [start + x.shape[1]] * len(lengths)
        return y


# Leaf modules whose forward the decode methods call directly (or skip: Dropout, in eval mode).
_DIRECT_LEAVES = (nn.Embedding, nn.Dropout, nn.ModuleList, Linear, LayerNorm, RMSNorm)


def direct_decode_ok(body: nn.Module) -> bool:
    """Whether ``body.decode_step(..., direct=True)`` computes exactly what the module path computes: a
    decoder with a cache in eval mode whose modules are all of pyllm's own classes (``direct_decode`` set on the
    class itself, so a user's subclass is not taken for its parent) or the leaves above, pre-norm, with no
    forward hook or pre-hook anywhere (the direct path calls ``forward``, not ``__call__``, to save the
    module machinery's cost, ~100 calls of a decode step). generate() checks this once per call."""
    from torch.nn.modules import module as _module

    if torch.is_grad_enabled() or any(getattr(_module, name, None) for name in
                                      ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return False
    for m in body.modules():
        cls = type(m)
        if m.training or m._forward_hooks or m._forward_pre_hooks:
            return False
        if not (cls in _DIRECT_LEAVES or cls.__dict__.get("direct_decode") is True):
            return False
        if cls is BlockStack and not m.pre_norm:
            return False
    return True
