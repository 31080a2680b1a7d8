"""Autoregressive decoding for GPTForCausalLM and LlamaForCausalLM: greedy, temperature, top-k, top-p, EOS, KV cache.

Batched prompts of different lengths are LEFT-padded: every row's last prompt token sits in the
last column, so one new query per row is decoded per step. Padding is hidden from attention by
the key padding mask and from the positions by counting real tokens only, so a padded row
decodes exactly as it would alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import check_inputs
from .block import KVCache, direct_decode_ok


def sample_next(logits, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator] = None):
    """logits (B, V) float -> next token ids (B,)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the most likely tokens until their mass reaches top_p (the first always stays)
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_generate_args(model, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p):
    cfg = getattr(model, "position_limits", model.config)  # Llama with dynamic rope runs past max positions
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] == 0:
        raise ValueError(f"generate: input_ids has batch size 0 (shape {tuple(input_ids.shape)}); expected at "
                         "least one prompt")
    B, N = check_inputs(cfg, input_ids, attention_mask, who="generate")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if N + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"generate: prompt length {N} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p!r}")
    if attention_mask is not None:
        mask = attention_mask.bool()
        # left padding: once a row has a real token, every later column is real
        right_padded = (mask[:, 1:].int() < mask[:, :-1].int()).any(-1)
        if bool(right_padded.any()):
            row = int(right_padded.nonzero()[0])
            raise ValueError(f"generate: attention_mask row {row} has padding after real tokens; expected LEFT "
                             f"padding (pad the prompts on the left, e.g. tokenizer(..., padding_side='left'))")
        if not bool(mask.any(-1).all()):
            row = int((~mask.any(-1)).nonzero()[0])
            raise ValueError(f"generate: attention_mask row {row} has no real token; expected at least one")
    return B, N


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int = 20, attention_mask=None, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True, compile=False):
    """Continue each prompt of `input_ids` (B, N) by up to `max_new_tokens` tokens.

    Greedy unless do_sample (then temperature, then top-k, then top-p filtering, then a draw with
    `generator`). A row that emits `eos_token_id` (default config.eos_token_id) is finished: it
    emits `pad_token_id` (default config.pad_token_id, else the EOS id) from then on, and decoding
    stops early once every row is finished. `attention_mask` (B, N) marks real tokens (1) for
    LEFT-padded prompts. use_cache=False recomputes the whole sequence each step (the reference
    the KV-cache path is tested against).

    compile=True (or a torch.compile backend name, e.g. "aot_eager") runs every decode step after the
    prompt as one ``torch.compile(fullgraph=True)`` graph with static shapes: the cache is frozen at its final size (KVCache.freeze), each step writes its
    token's K/V in place and attends over the whole buffer with the not-yet-written columns masked, so
    one compilation serves every step (and later calls of the same batch size and total length). The
    tokens are those of the eager path. Sliding windows shorter than the total length are refused there
    (the static buffer is not bottom-right aligned with the query).

    Returns (B, N + new) token ids, the prompt included.
    """
    B, N = _check_generate_args(model, input_ids, max_new_tokens, attention_mask, do_sample,
                                temperature, top_k, top_p)
    cfg = model.config
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
    pad = 0 if pad is None else pad
    # checked now, not when the first row finishes and the id is fed back to the model
    for name, value in (("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < cfg.vocab_size):
            raise ValueError(f"generate: {name} must be a token id in [0, {cfg.vocab_size}), got {value!r}")
    device, total = input_ids.device, N + max_new_tokens
    body = model.transformer if hasattr(model, "transformer") else model.model  # GPT / Llama backbone
    # tokens and mask live in buffers of the final size, written in place (no per-step concatenation)
    tokens = input_ids.new_empty(B, total, dtype=torch.long)
    tokens[:, :N] = input_ids
    mask = torch.ones(B, total, dtype=torch.long, device=device)
    if attention_mask is not None:
        mask[:, :N] = attention_mask
    # checked once here: the decode steps below skip the per-call input checks (decode_step)
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    key_padding = mask.bool() if padded else None
    position = mask[:, :N].sum(-1, keepdim=True)  # (B, 1): position of the token at column N (real ones counted)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(cfg.num_layers, capacity=total) if use_cache else None  # preallocated, filled in place
    if compile:
        step_fn, write_at, visible = _compiled_step(model, body, compile, use_cache, mask, N, total)
    # eval mode, no hooks, pyllm's own modules: the decode steps call the submodules' forward directly
    direct = use_cache and not compile and direct_decode_ok(body)
    plan = body.decode_plan() if direct else None  # and the blocks as one C++ call (block.StackPlan)
    cur = N
    for step in range(max_new_tokens):
        if not use_cache:  # the reference the cached path is tested against: recompute everything
            h = body(tokens[:, :cur], attention_mask=mask[:, :cur]).last_hidden_state[:, -1]
        elif step == 0:  # the prompt, through the checked forward
            h = body(tokens[:, :N], attention_mask=mask[:, :N], cache=cache).last_hidden_state[:, -1]
        elif compile:  # the same step, compiled, over the whole (static) cache
            if step == 1:
                cache.freeze(write_at)
            write_at.fill_(cur - 1)
            visible[:, cur - 1] = True
            h = step_fn(nxt[:, None], position + (step - 1), visible, cache)
        else:  # one token per row against the cache
            kpm = key_padding[:, :cur] if padded else None
            h = body.decode_step(tokens[:, cur - 1:cur], position + (step - 1), kpm, cache, direct=direct,
                                 plan=plan)[:, -1]
        logits = model.lm_head(h).float()  # (B, V)
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)  # (B,)
        if eos is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= nxt == eos
        tokens[:, cur] = nxt
        cur += 1
        if eos is not None and bool(finished.all()):
            break
    return tokens[:, :cur]


def _compiled_step(model, body, compile, use_cache: bool, mask, N: int, total: int):
    """(the compiled decode step, the (1,) cache column it writes, the (B, total) visible-keys mask), for
    generate(compile=True). Refuses what the static cache cannot do exactly."""
    if not isinstance(compile, (bool, str)):
        raise ValueError(f"generate: compile must be True, False or a torch.compile backend name, got {compile!r}")
    if not use_cache:
        raise ValueError("generate: compile=True needs use_cache=True (it compiles the cached decode step)")
    window = getattr(model.config, "sliding_window", None)
    if window is not None and total > window and any(model.config.window(i) for i in range(model.config.num_layers)):
        raise ValueError(f"generate: compile=True does not support a sliding window ({window}) shorter than the "
                         f"prompt + new tokens ({total}); use compile=False")
    write_at = torch.zeros(1, dtype=torch.long, device=mask.device)
    visible = mask.bool().clone()
    visible[:, N:] = False  # (B, total): real prompt tokens; each step adds its own column

    def step(last, position, key_padding_mask, cache):  # (B, 1), (B, 1), (B, total) -> (B, C)
        return body.decode_step(last, position, key_padding_mask, cache)[:, -1]

    backend = "inductor" if compile is True else compile
    return torch.compile(step, fullgraph=True, dynamic=False, backend=backend), write_at, visible
