"""Generation for encoder-decoders: greedy, sampling (temperature, top-k, top-p), beam search and beam
sampling (do_sample=True with num_beams > 1).

The encoder runs once; the decoder feeds one token per step against a KV cache (self-attention) and
the cross-attention K/V computed at the first step. Outputs start with the decoder start token, as
transformers' `generate()` does for encoder-decoders: (B, 1 + new).

Beam search is transformers' vectorized algorithm (v4.50+): per step keep the top
`max(2, 1 + #eos) * num_beams` continuations over all beams; those that end (EOS or the length limit)
and rank among the first `num_beams` become finished hypotheses scored `sum logprob / len ** length_penalty`;
the best `num_beams` unfinished ones continue. Stopping follows `early_stopping` (True: once every
source has num_beams finished hypotheses; False: when the best running beam cannot beat the worst
finished one at the current length; "never": at the best length it could reach). The same algorithm on
the same logits gives the same tokens as `transformers.generate(num_beams=...)` (tested).

Beam sampling is transformers' too: the beams' log-probs go through temperature, top-k and top-p (each
keeping at least 1 + #EOS tokens per beam), then the candidates are drawn without replacement from the
softmax over all beams' accumulated scores and ranked by score; under the same torch seed it draws what
transformers' `generate(do_sample=True, num_beams=...)` draws (tested). It is not beam search with noise:
even with top_k=1 each beam offers its 1 + #EOS best tokens, so the kept candidates can differ from beam
search's overall best.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .block import KVCache
from .generation import sample_next

_UNSET = object()


class Seq2SeqCache:
    """Decoder state for incremental decoding: self-attention K/V (a growing KVCache per layer) and the
    cross-attention K/V of the encoder output, computed at the first step and reused after."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.self_attn = KVCache(num_layers, capacity)
        self.cross: list[Optional[tuple]] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return self.self_attn.seq_len

    def reorder(self, index: torch.Tensor):
        """Keep rows `index` (B',) of the self-attention cache (beam search picks its survivors). Beams of
        one source share its encoder output, so the cross-attention K/V need no reordering."""
        c = self.self_attn
        for i, (k, v) in enumerate(zip(c.k, c.v)):
            if k is not None:
                c.k[i], c.v[i] = k.index_select(0, index), v.index_select(0, index)


def _defaults(model, **given):
    """Explicit arguments, else the model's generation_config (generation_config.json), else its config."""
    gen, cfg = model.generation_config, model.config
    out = {}
    for k, v in given.items():
        if v is _UNSET:
            v = gen.get(k, getattr(cfg, k, None))
        out[k] = v
    return out


def _no_repeat_ngram(tokens: torch.Tensor, scores: torch.Tensor, n: int):
    """Ban every token that would repeat an n-gram already in the row. tokens (R, L), scores (R, V)."""
    L = tokens.shape[1]
    if L + 1 < n:
        return scores
    for r, row in enumerate(tokens.tolist()):
        prefix = tuple(row[L + 1 - n:])
        banned = [row[i + n - 1] for i in range(L - n + 1) if tuple(row[i:i + n - 1]) == prefix]
        if banned:
            scores[r, banned] = float("-inf")
    return scores


def _process(scores, tokens, cur_len: int, max_length: int, o: dict):
    """transformers' logits processors in its order: no_repeat_ngram, forced BOS (first step), forced EOS
    (last step). scores (R, V) float; tokens (R, cur_len) the decoder tokens so far."""
    if o["no_repeat_ngram_size"]:
        scores = _no_repeat_ngram(tokens, scores, o["no_repeat_ngram_size"])
    for forced, when in ((o["forced_bos_token_id"], cur_len == 1), (o["forced_eos_token_id"], cur_len == max_length - 1)):
        if forced is not None and when:
            ids = forced if isinstance(forced, (list, tuple)) else [forced]
            scores = torch.full_like(scores, float("-inf"))
            scores[:, ids] = 0.0
    return scores


def _check(model, input_ids, attention_mask, o):
    who = f"{type(model).__name__}.generate"
    n = o["max_new_tokens"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{who}: max_new_tokens must be an int >= 1, got {n!r}")
    nb = o["num_beams"]
    if not isinstance(nb, int) or isinstance(nb, bool) or nb < 1:
        raise ValueError(f"{who}: num_beams must be an int >= 1, got {nb!r}")
    if o["decoder_start_token_id"] is None:
        raise ValueError(f"{who}: decoder_start_token_id is not set (neither passed, nor in generation_config.json "
                         f"or config.json)")
    if o["early_stopping"] not in (True, False, "never"):
        raise ValueError(f"{who}: early_stopping must be True, False or 'never', got {o['early_stopping']!r}")
    ngram = o["no_repeat_ngram_size"]
    if ngram is not None and (not isinstance(ngram, int) or ngram < 0):
        raise ValueError(f"{who}: no_repeat_ngram_size must be None or an int >= 0, got {ngram!r}")
    if not isinstance(o["do_sample"], bool):
        raise ValueError(f"{who}: do_sample must be True or False, got {o['do_sample']!r}")
    if o["do_sample"]:
        if not o["temperature"] > 0:
            raise ValueError(f"{who}: temperature must be > 0 when sampling, got {o['temperature']!r}")
        if o["top_k"] is not None and (not isinstance(o["top_k"], int) or o["top_k"] < 1):
            raise ValueError(f"{who}: top_k must be None or an int >= 1, got {o['top_k']!r}")
        if o["top_p"] is not None and not 0.0 < o["top_p"] <= 1.0:
            raise ValueError(f"{who}: top_p must be None or in (0, 1], got {o['top_p']!r}")
    cfg = model.config
    if cfg.position != "relative" and 1 + n > cfg.max_position_embeddings:
        raise ValueError(f"{who}: 1 + max_new_tokens = {1 + n} exceeds max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    if attention_mask is not None and not bool(attention_mask.bool().any(-1).all()):
        row = int((~attention_mask.bool().any(-1)).nonzero()[0])
        raise ValueError(f"{who}: attention_mask row {row} has no real token; every source needs one")


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=_UNSET, num_beams=_UNSET, do_sample=_UNSET,
             temperature=_UNSET, top_k=_UNSET, top_p=_UNSET, length_penalty=_UNSET,
             early_stopping: Union[bool, str] = _UNSET, no_repeat_ngram_size=_UNSET, decoder_start_token_id=_UNSET,
             eos_token_id=_UNSET, pad_token_id=_UNSET, forced_bos_token_id=_UNSET, forced_eos_token_id=_UNSET,
             generator: Optional[torch.Generator] = None, use_cache: bool = True):
    """Generate target ids for source ids (B, M) with attention_mask (B, M) (1 = real; any padding side).

    Unset arguments come from `model.generation_config` (the folder's generation_config.json), then the
    model config, then transformers' defaults (max_new_tokens = max_length - 1 or 19, num_beams 1,
    length_penalty 1.0, early_stopping False). Returns (B, 1 + new) ids: the decoder start token, the
    generated tokens, and after a row's EOS the pad id. use_cache=False recomputes the decoder over the
    whole prefix each step (the reference the cache is tested against).
    """
    o = _defaults(model, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                  temperature=temperature, top_k=top_k, top_p=top_p, length_penalty=length_penalty,
                  early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size,
                  decoder_start_token_id=decoder_start_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=forced_eos_token_id)
    if o["max_new_tokens"] is None:
        o["max_new_tokens"] = model.generation_config.get("max_length", 20) - 1
    for k, default in (("num_beams", 1), ("do_sample", False), ("temperature", 1.0), ("length_penalty", 1.0),
                       ("early_stopping", False)):
        if o[k] is None:
            o[k] = default
    _check(model, input_ids, attention_mask, o)
    memory = model.model.encode(input_ids, attention_mask)  # (B, M, C), once
    mask = attention_mask
    eos = o["eos_token_id"]
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if o["num_beams"] == 1:
        return _greedy_or_sample(model, memory, mask, eos, o, generator, use_cache)
    return _beam_search(model, memory, mask, eos, o, use_cache, generator)


def _step(model, tokens, memory, mask, cache, use_cache):
    """Next-token logits (R, V) in fp32 for decoder tokens (R, L)."""
    ids = tokens[:, -1:] if use_cache and cache.seq_len else tokens
    h = model.model.decode(ids, memory, mask, cache=cache if use_cache else None)
    return model.logits(h[:, -1]).float()


def _greedy_or_sample(model, memory, mask, eos, o, generator, use_cache):
    B = memory.shape[0]
    pad = o["pad_token_id"] if o["pad_token_id"] is not None else (eos[0] if eos else 0)
    max_length = 1 + o["max_new_tokens"]
    tokens = torch.full((B, 1), o["decoder_start_token_id"], dtype=torch.long, device=memory.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=memory.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=memory.device)
    cache = Seq2SeqCache(model.config.decoder_layers, capacity=max_length)
    while tokens.shape[1] < max_length:
        scores = _process(_step(model, tokens, memory, mask, cache, use_cache), tokens, tokens.shape[1],
                          max_length, o)
        nxt = sample_next(scores, o["do_sample"], o["temperature"], o["top_k"], o["top_p"], generator)  # (B,)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos:
            unfinished &= ~torch.isin(nxt, eos_t)
            if not bool(unfinished.any()):
                break
    return tokens


def _warp(scores, o: dict, min_keep: int):
    """Beam sampling's logits warpers, transformers' in its order, on log-probabilities (R, V): temperature,
    top-k, top-p, each keeping at least ``min_keep`` tokens per beam (one more than the EOS ids, so a beam can
    always continue)."""
    if o["temperature"] != 1.0:
        scores = scores / o["temperature"]
    if o["top_k"]:
        k = min(max(o["top_k"], min_keep), scores.shape[-1])
        scores = scores.masked_fill(scores < scores.topk(k)[0][:, -1:], float("-inf"))
    if o["top_p"] is not None and o["top_p"] < 1.0:
        ascending, order = scores.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - o["top_p"]
        drop[:, -min_keep:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def _beam_search(model, memory, mask, eos, o, use_cache, generator=None):
    """Beam search, or beam sampling with do_sample=True: the `keep` candidates per source are drawn without
    replacement from softmax(accumulated warped log-probs) over all its beams' continuations (then ranked by
    score) instead of taken as the top `keep`; everything else is beam search."""
    B, K, dev = memory.shape[0], o["num_beams"], memory.device
    lp, early = o["length_penalty"], o["early_stopping"]
    max_length, cur_len, prompt_len = 1 + o["max_new_tokens"], 1, 1
    # memory (B, M, C) stays one row per source: the decoder's B*K rows (beam k of source b at b*K + k) read it
    # as groups of K, so the cross-attention K/V are computed and read once per source, not per beam
    pad = o["pad_token_id"]
    fill = (pad if pad else eos[0]) if eos else -1  # transformers' `pad or eos[0]` (pad id 0 fills with EOS)
    keep = max(2, 1 + len(eos)) * K
    top_mask = torch.arange(keep, device=dev) < K
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, 0] = o["decoder_start_token_id"]
    sequences = running.clone()
    running_scores = torch.zeros(B, K, device=dev)
    running_scores[:, 1:] = -1e9  # only the first beam expands at step one
    beam_scores = torch.full((B, K), -1e9, device=dev)
    finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    running_idx = torch.full((B, K, max_length - 1), -1, dtype=torch.long, device=dev)
    beam_idx = running_idx.clone()
    cache = Seq2SeqCache(model.config.decoder_layers, capacity=max_length)
    gather = lambda t, i: t.take_along_dim(i.view(*i.shape, *([1] * (t.dim() - 2))), dim=1)  # noqa: E731
    while True:
        flat = running[:, :, :cur_len].reshape(B * K, cur_len)
        logprobs = _process(_step(model, flat, memory, mask, cache, use_cache).log_softmax(-1), flat, cur_len,
                            max_length, o)
        if o["do_sample"]:
            logprobs = _warp(logprobs, o, len(eos) + 1 if eos else 2)
        V = logprobs.shape[-1]
        logprobs = (logprobs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        if o["do_sample"]:
            topk = torch.multinomial(logprobs.softmax(-1), keep, generator=generator)  # (B, keep), no repeats
            topk_scores, order = logprobs.gather(1, topk).sort(-1, descending=True)
            topk = topk.gather(1, order)
        else:
            topk_scores, topk = logprobs.topk(keep)  # (B, keep)
        from_beam = topk // V
        cand = gather(running, from_beam)  # (B, keep, max_length)
        cand[:, :, cur_len] = topk % V
        cand_idx = gather(running_idx, from_beam)
        cand_idx[:, :, cur_len - prompt_len] = from_beam + torch.arange(B, device=dev)[:, None] * K
        hits = torch.isin(topk % V, eos_t) | (cur_len + 1 >= max_length)  # (B, keep)
        # the best num_beams candidates that did not end continue
        alive = topk_scores + hits.float() * -1.0e9
        nxt = alive.topk(K)[1]
        running, running_scores, running_idx = gather(cand, nxt), gather(alive, nxt), gather(cand_idx, nxt)
        # candidates that ended among the first num_beams may enter the finished set
        just = hits & top_mask[None]
        scored = topk_scores / ((cur_len + 1 - prompt_len) ** lp)
        scored = scored + (finished.all(-1, keepdim=True) & (early is True)).float() * -1.0e9
        scored = scored + (~can_improve).float() * -1.0e9
        scored = scored + (~just) * -1.0e9
        merged = torch.cat([beam_scores, scored], 1).topk(K)[1]
        sequences = gather(torch.cat([sequences, cand], 1), merged)
        beam_scores = gather(torch.cat([beam_scores, scored], 1), merged)
        beam_idx = gather(torch.cat([beam_idx, cand_idx], 1), merged)
        finished = gather(torch.cat([finished, just], 1), merged)
        if use_cache:
            cache.reorder(running_idx[:, :, cur_len - prompt_len].reshape(-1))
        cur_len += 1
        best_len = max_length - prompt_len if (early == "never" and lp > 0.0) else cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_done = torch.where(finished, beam_scores.min(1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & (best_running > worst_done).any(-1, keepdim=True)
        if not (bool(can_improve.any()) and not (bool(finished.all()) and early is True) and not bool(hits.all())):
            break
    generated = int((beam_idx[:, 0] + 1).bool().sum(-1).max())
    return sequences[:, 0, :prompt_len + generated]
