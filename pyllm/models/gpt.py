"""GPT: a pre-norm causal decoder with learned positions (GPT-2's layout), and its heads.

`model(input_ids, attention_mask=None, labels=None)` as in transformers; `attention_mask`
(B, N) with 1 = real token. Positions are counted over real tokens only (from the mask), so a
left-padded row gets the same positions, and the same outputs, as the unpadded row.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import (CausalLMOutput, PreTrainedModel, causal_lm_head, decoder_forward, default_positions,
                   last_token_classification, lm_head_and_loss, positions_from_mask)
from .block import BlockStack, KVCache, StackPlan
from .config import TransformerConfig
from .generation import generate


def _renamed_blocks(module, state_dict, prefix, *args):
    """State dicts saved before the layer stack was renamed (``encoder.`` -> ``blocks.``) still load."""
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        state_dict[prefix + "blocks." + key[len(prefix + "encoder."):]] = state_dict.pop(key)


class GPTModel(PreTrainedModel):
    """Token + position embeddings -> pre-norm causal blocks -> final LayerNorm.

    forward -> BaseModelOutput(last_hidden_state (B, N, C), cache)
    With `cache` (a KVCache, filled in place) the N tokens continue the cached ones; then
    attention_mask, if given, covers cached + new positions: (B, past + N).
    With `cu_seqlens` ((documents + 1,) int32 offsets into the B * N tokens, pyllm.data.PackedCollator)
    the rows hold documents packed end to end: attention stays inside each document (attention_varlen) and
    positions restart at each document unless position_ids are given.
    """

    family = "gpt2"
    default_norm_position = "pre"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        config = self.config
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.blocks = BlockStack(config, causal=True, pre_norm=config.norm_position == "pre")
        self.init_weights()
        self.register_load_state_dict_pre_hook(_renamed_blocks)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                cache: Optional[KVCache] = None, use_cache: bool = False, cu_seqlens=None):
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError(f"{type(self).__name__}: GPT models have no token-type embeddings; token_type_ids "
                             f"must be None or all zeros")
        return decoder_forward(self, self.config, input_ids, attention_mask, token_type_ids, position_ids, cache,
                               use_cache, cu_seqlens)

    direct_decode = True

    def decode_step(self, input_ids, position_ids, key_padding_mask=None, cache: Optional[KVCache] = None,
                    direct: bool = False, plan: Optional[StackPlan] = None):
        """forward without the input checks and mask derivations, for generate()'s decode loop, which checks
        once: input_ids (B, N), position_ids (B or 1, N), key_padding_mask (B, past + N) bool or None
        -> last hidden state (B, N, C). direct=True (only where block.direct_decode_ok(self), with a cache)
        calls the submodules' forward directly: the same ops, without nn.Module's per-call cost; with it,
        plan (decode_plan()) runs the blocks as one C++ call where it can."""
        if direct:
            x = self.word.forward(input_ids) + self.position.forward(position_ids)
            return self.blocks.decode(x, key_padding_mask, cache, plan)
        x = self.dropout(self.word(input_ids) + self.position(position_ids))  # (B, N, C)
        return self.blocks(x, key_padding_mask=key_padding_mask, cache=cache)

    def decode_plan(self) -> Optional[StackPlan]:
        """decode_step's plan (None: the decode methods run): see block.StackPlan."""
        return self.blocks.decode_plan()


class GPTForCausalLM(PreTrainedModel):
    """GPT + a language-model head tied to the token embeddings (unless tie_word_embeddings=False).

    labels (B, N): usually input_ids itself; shifted inside (position t predicts token t + 1);
    -100 positions are ignored. While training (``model.train()``) with labels, the loss comes from
    ``pyllm.linear_cross_entropy`` and the (B, N, vocab) logits are not formed: ``logits`` is None unless
    ``return_logits=True``. In eval mode, or without labels, logits are returned as usual.
    """

    family = "gpt2"
    default_norm_position = "pre"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        config = self.config
        self.transformer = GPTModel(config)
        self.lm_head = causal_lm_head(self, self.transformer.word)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                cache: Optional[KVCache] = None, use_cache: bool = False, return_logits: Optional[bool] = None,
                cu_seqlens=None):
        out = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, cache, use_cache,
                               cu_seqlens=cu_seqlens)
        loss, logits = lm_head_and_loss(self, out.last_hidden_state, self.lm_head, labels, input_ids, return_logits)
        return CausalLMOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state, cache=out.cache)

    def generate(self, input_ids, max_new_tokens: int = 20, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True, compile=False):
        """Continue each prompt; returns (B, prompt_len + new) token ids. See generation.generate."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
                        use_cache=use_cache, compile=compile)


class GPTForSequenceClassification(PreTrainedModel):
    """GPT + a linear scorer read at each row's last real token (from attention_mask, else the last
    token that is not pad_token_id, as transformers does). labels (B,) class ids."""

    family = "gpt2"
    default_norm_position = "pre"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        config = self.config
        self.transformer = GPTModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.init_weights(self.score)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None):
        h = self.transformer(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        return last_token_classification(self, h, self.score, input_ids, attention_mask, labels)


__all__ = ["GPTModel", "GPTForCausalLM", "GPTForSequenceClassification", "positions_from_mask", "default_positions"]
