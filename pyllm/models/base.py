"""What every pyllm model shares: output dataclasses, weight init, input checks, checkpoint I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyllm.nn import LayerNorm, Linear

from ..ops import linear_cross_entropy

from .block import BlockStack, KVCache, packed_positions, packed_sequences
from .config import TransformerConfig


@dataclass
class ModelOutput:
    """Fields are attributes (`out.logits`); `out["logits"]` works too. Unset fields are None."""

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, N, C)
    pooler_output: Optional[torch.Tensor] = None  # (B, C), BERT with a pooler
    cache: Optional[KVCache] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, N, vocab)
    last_hidden_state: Optional[torch.Tensor] = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, N, vocab)
    last_hidden_state: Optional[torch.Tensor] = None
    cache: Optional[KVCache] = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, num_labels)
    last_hidden_state: Optional[torch.Tensor] = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, N, num_labels)
    last_hidden_state: Optional[torch.Tensor] = None


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    start_logits: torch.Tensor = None  # (B, N)
    end_logits: torch.Tensor = None  # (B, N)
    last_hidden_state: Optional[torch.Tensor] = None


def check_inputs(config: TransformerConfig, input_ids, attention_mask=None, token_type_ids=None,
                 position_ids=None, past_len: int = 0, who: str = "model"):
    """Raise ValueError naming what was expected and what came. Returns (B, N)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{who}: input_ids must be a (batch, seqlen) tensor, got {got}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: input_ids must hold integer token ids (int64), got {input_ids.dtype}")
    B, N = input_ids.shape
    if N == 0:
        raise ValueError(f"{who}: input_ids has seqlen 0; expected at least one token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{who}: input_ids holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")
    if past_len + N > config.max_position_embeddings:
        raise ValueError(f"{who}: sequence length {past_len + N}"
                         f"{f' ({past_len} cached + {N} new)' if past_len else ''} exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")
    if attention_mask is not None:
        want = (B, past_len + N)
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != want:
            got = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                   else type(attention_mask).__name__)
            raise ValueError(f"{who}: attention_mask must have shape {want} (batch, "
                             f"{'cached + new' if past_len else 'seqlen'}) like input_ids, got {got}")
    if token_type_ids is not None and tuple(token_type_ids.shape) != (B, N):
        raise ValueError(f"{who}: token_type_ids must have shape {(B, N)} like input_ids, "
                         f"got {tuple(token_type_ids.shape)}")
    if position_ids is not None and tuple(position_ids.shape) not in ((B, N), (1, N)):
        raise ValueError(f"{who}: position_ids must have shape {(B, N)} or {(1, N)}, got {tuple(position_ids.shape)}")
    if position_ids is not None and (int(position_ids.min()) < 0
                                     or int(position_ids.max()) >= config.max_position_embeddings):
        raise ValueError(f"{who}: position_ids must be in [0, max_position_embeddings="
                         f"{config.max_position_embeddings}), got values in "
                         f"[{int(position_ids.min())}, {int(position_ids.max())}]")
    return B, N


def padding_mask(attention_mask) -> Optional[torch.Tensor]:
    """HF attention_mask (1 = real) -> pyllm key_padding_mask (bool, True = real); None if no padding."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


def causal_lm_loss(logits, labels, input_ids, vocab_size: int, who: str):
    """Next-token cross entropy: position t predicts labels[t + 1]; -100 is ignored. logits (B, N, V)."""
    check_labels(labels, input_ids.shape, who)
    check_class_labels(labels, vocab_size, who)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def positions_from_mask(attention_mask, n_new: int):
    """(B, past + N) mask -> (B, N) positions counting real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n_new:]


def default_positions(attention_mask, past: int, n_new: int, device):
    """Positions of n_new tokens after `past` cached ones: counted over real tokens when a mask (B, past +
    n_new) is given -> (B, n_new), else past, past + 1, ... -> (1, n_new)."""
    if attention_mask is not None:
        return positions_from_mask(attention_mask, n_new)
    return torch.arange(past, past + n_new, device=device)[None]


def decoder_forward(model, limits, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                    cache: Optional[KVCache] = None, use_cache: bool = False, cu_seqlens=None) -> "BaseModelOutput":
    """The checked forward of a decoder backbone (GPTModel, LlamaModel) over its unchecked
    ``model.decode_step(input_ids, position_ids, key_padding_mask, cache)``: inputs checked against
    ``limits`` (vocab_size, max_position_embeddings), positions counted over real tokens, a new cache when
    use_cache -> BaseModelOutput(last_hidden_state (B, N, C), cache). With ``cu_seqlens`` (packed documents,
    pyllm.data.PackedCollator) attention stays inside each document and positions restart at each one."""
    who = type(model).__name__
    past = cache.seq_len if cache is not None else 0
    B, N = check_inputs(limits, input_ids, attention_mask, token_type_ids, position_ids, past, who)
    mask = padding_mask(attention_mask)
    if cu_seqlens is not None:
        mask = packed_sequences(cu_seqlens, input_ids, attention_mask, cache, who)
        if position_ids is None:
            position_ids = packed_positions(cu_seqlens, input_ids.shape)
    if position_ids is None:
        position_ids = default_positions(attention_mask, past, N, input_ids.device)
    if use_cache and cache is None:
        cache = KVCache(model.config.num_layers)
    x = model.decode_step(input_ids, position_ids, mask, cache)
    return BaseModelOutput(last_hidden_state=x, cache=cache)


def causal_lm_head(model, embeddings: nn.Embedding) -> Linear:
    """The (vocab, hidden) LM head of a decoder, freshly initialized, or tied to the token embeddings
    (the same Parameter) when config.tie_word_embeddings."""
    head = Linear(model.config.hidden_size, model.config.vocab_size, bias=False, backend=model.config.backend)
    model.init_weights(head)
    if model.config.tie_word_embeddings:
        head.weight = embeddings.weight
    return head


def last_token_classification(model, h, score: nn.Linear, input_ids, attention_mask, labels):
    """The sequence-classification head of a decoder: `score` (hidden -> num_labels) read at each row's last
    real token of h (B, N, C) (see last_token) -> SequenceClassifierOutput(loss, logits (B, num_labels))."""
    last = last_token(input_ids, attention_mask, model.config.pad_token_id)  # (B,)
    logits = score(h[torch.arange(h.shape[0], device=h.device), last])  # (B, num_labels)
    loss = None
    if labels is not None:
        loss = classification_loss(logits, labels, model.config.num_labels, type(model).__name__)
    return SequenceClassifierOutput(loss=loss, logits=logits, last_hidden_state=h)


def classification_loss(logits, labels, num_labels: int, who: str):
    """transformers' rule: 1 label -> MSE regression; integer labels -> cross entropy;
    float labels (B, num_labels) -> multi-label BCE."""
    B = logits.shape[0]
    if num_labels == 1:
        if labels.numel() != B:
            raise ValueError(f"{who}: labels must have {B} values (one per sequence), got shape {tuple(labels.shape)}")
        return F.mse_loss(logits.view(-1).float(), labels.view(-1).float())
    if labels.dtype in (torch.int64, torch.int32):
        check_labels(labels, (B,), who)
        check_class_labels(labels, num_labels, who)
        return F.cross_entropy(logits.float(), labels.long(), ignore_index=-100)
    check_labels(labels, (B, num_labels), who)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def lm_head_and_loss(model, h, lm_head: nn.Linear, labels, input_ids, return_logits: Optional[bool]):
    """The causal-LM head of GPTForCausalLM and LlamaForCausalLM: h (B, N, C) -> (loss or None, logits or None).

    While training (``model.training``) with labels, the loss comes from ``pyllm.linear_cross_entropy``
    and the (B, N, vocab) logits are never formed: logits is None unless ``return_logits=True``. In eval
    mode, or without labels, logits (B, N, vocab) are computed as usual (and the loss from them)."""
    if return_logits is None:
        return_logits = labels is None or not model.training
    logits = lm_head(h) if return_logits else None  # (B, N, vocab)
    if labels is None:
        return None, logits
    who = type(model).__name__
    if logits is not None:
        return causal_lm_loss(logits, labels, input_ids, model.config.vocab_size, who), logits
    check_labels(labels, input_ids.shape, who)
    check_class_labels(labels, model.config.vocab_size, who)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts t + 1; the last predicts nothing
    return linear_cross_entropy(h, lm_head.weight, shifted, bias=lm_head.bias, backend=model.config.backend), None


def last_token(input_ids, attention_mask, pad_token_id):
    """(B,) index of each row's last real token: from attention_mask (left or right padding), else the last
    token that is not pad_token_id (as transformers does), else the last column."""
    B, N = input_ids.shape
    idx = torch.arange(N, device=input_ids.device)
    if attention_mask is not None:
        return (idx * attention_mask.bool()).argmax(-1)
    if pad_token_id is not None:
        return (idx * (input_ids != pad_token_id)).argmax(-1)
    return torch.full((B,), N - 1, device=input_ids.device)


def check_labels(labels, shape, who: str, name: str = "labels"):
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")


def check_class_labels(labels, num_classes: int, who: str, name: str = "labels"):
    """Class indices must be in [0, num_classes) or -100 (ignored)."""
    bad = (labels != -100) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"{who}: {name} holds {int(labels[bad][0])}; expected class ids in "
                         f"[0, {num_classes}) or -100 (ignored)")


def _is_layer_stack(m: nn.Module) -> bool:
    """The modules that own a `gradient_checkpointing` switch (BlockStack, LlamaLayers)."""
    return isinstance(m, BlockStack) or getattr(m, "is_layer_stack", False)


class PreTrainedModel(nn.Module):
    """Base of every pyllm model: config, weight init, gradient checkpointing, HF checkpoints."""

    family = ""  # "bert" or "gpt2": which Hugging Face model_type this class reads and writes
    config_class = TransformerConfig  # what from_pretrained builds from config.json
    default_norm_position = "post"

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"{type(self).__name__}: config must be a TransformerConfig, got {type(config).__name__}")
        if config.norm_position is None:
            config = config.replace(norm_position=self.default_norm_position)
        self.config = config

    def init_weights(self, *roots: nn.Module):
        """Normal(0, initializer_range) for matrices and embeddings, zero biases, unit norms;
        GPT-style output projections scaled by 1/sqrt(2 * layers) (GPT-2's residual scaling).
        With `roots`, only those submodules (a head on a backbone that initialized itself)."""
        std = self.config.initializer_range
        for name, module in (item for root in (roots or (self,)) for item in root.named_modules()):
            if isinstance(module, nn.Linear):
                s = std / math.sqrt(2 * self.config.num_layers) if (
                    self.family == "gpt2" and name.endswith(("attn.proj", "mlp.fc2"))) else std
                nn.init.normal_(module.weight, 0.0, s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (LayerNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if _is_layer_stack(m))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        """Recompute each block in the backward pass (torch.utils.checkpoint): less memory, ~1/3 more compute."""
        for m in self.modules():
            if _is_layer_stack(m):
                m.gradient_checkpointing = bool(on)

    def gradient_checkpointing_enable(self):
        """transformers' spelling of `model.gradient_checkpointing = True`."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, folder, *, dtype: Optional[torch.dtype] = None, strict: bool = False, **overrides):
        """Read a Hugging Face checkpoint folder (config.json + model.safetensors or pytorch_model.bin).

        `overrides` replace config fields (e.g. num_labels=3, backend="reference", hidden_dropout=0.0).
        Head weights absent from the checkpoint are initialized fresh with a warning (the usual
        fine-tuning start), or raise if strict=True; missing backbone weights always raise.
        """
        from .hf_io import load_pretrained
        return load_pretrained(cls, folder, dtype=dtype, strict=strict, **overrides)

    def save_pretrained(self, folder, *, overwrite: bool = False, max_shard_size=None):
        """Write config.json + model.safetensors in Hugging Face's layout (transformers reads it back).

        max_shard_size (bytes, or "5GB" / "500MiB" as transformers spells it): past it, the weights go
        into model-0000i-of-0000N.safetensors shards listed by model.safetensors.index.json."""
        from .hf_io import save_pretrained
        save_pretrained(self, folder, overwrite=overwrite, max_shard_size=max_shard_size)
