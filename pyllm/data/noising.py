"""Pretraining encoder-decoders from plain text: T5 span corruption and BART text infilling.

Both collators take blocks of token ids (``{"input_ids": [...]}``, as :func:`seq2seq_lm_features` cuts
them) and return ``{"input_ids", "attention_mask", "labels"}`` LongTensors, the noised text as the
encoder's input and what the decoder must write as labels (the model shifts them right into its
``decoder_input_ids``; -100 pads labels). All randomness comes from the ``generator`` passed in (the
trainer seeds one per batch), so a batch is a function of the features and the generator's seed.

**Span corruption** (:class:`SpanCorruptionCollator`, T5; Raffel et al. 2020, and transformers'
``run_t5_mlm_flax.py``): of a block of L tokens, ``round(L * noise_density)`` (default 0.15) tokens are
noise, split into ``round(noise / mean_span_length)`` spans (default mean 3) placed at random between as
many non-noise spans. Each noise span becomes one sentinel ``<extra_id_k>`` in the input (k = 0, 1, ...);
the labels are each sentinel followed by the tokens it hid, then EOS::

    input:  Thank you <extra_id_0> me to your party <extra_id_1> week </s>
    labels: <extra_id_0> for inviting <extra_id_1> last </s>

Every example of a block length has the same input and label lengths (:func:`span_corruption_lengths`).

**Text infilling** (:class:`TextInfillingCollator`, BART; Lewis et al. 2020): ``ceil(n * noise_density)``
(default 0.3) of the n tokens before the final EOS are masked, in spans whose lengths are drawn from
Poisson(``mean_span_length``) (default 3); each span becomes one ``<mask>`` token (a span of length 0
inserts a ``<mask>``), spans never touch each other. The labels are the whole original block. With
``permute_sentences`` the sentences (ending in ``.``, ``!`` or ``?``) are shuffled before masking, as
BART's sentence permutation does.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .collate import IGNORE_INDEX, pack_blocks

SENTINEL = "<extra_id_{}>"  # T5's sentinel tokens
NUM_SENTINELS = 100  # as T5's vocabularies have


def _num_noise(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a block of ``length`` tokens, as run_t5_mlm_flax counts them."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(min(noise, length - noise) / mean_span_length), 1)
    return noise, spans


def span_corruption_lengths(block_length: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> tuple[int, int]:
    """(encoder input length, label length) of span corruption on blocks of ``block_length`` tokens, EOS
    included in both."""
    noise, spans = _num_noise(block_length, noise_density, mean_span_length)
    return block_length - noise + spans + 1, noise + spans + 1


def span_corruption_block_length(input_length: int, noise_density: float = 0.15,
                                 mean_span_length: float = 3.0) -> int:
    """The longest block whose span-corrupted input (EOS included) fits in ``input_length`` tokens
    (run_t5_mlm_flax's ``compute_input_and_target_lengths``)."""
    n = 2
    while span_corruption_lengths(n + 1, noise_density, mean_span_length)[0] <= input_length:
        n += 1
    return n


def _segments(num_items: int, num_segments: int, generator) -> list[int]:
    """A random split of ``num_items`` into ``num_segments`` non-empty parts (their lengths, in order)."""
    cuts = (torch.randperm(num_items - 1, generator=generator)[:num_segments - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, num_items]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(length,) bool: T5's noise mask, alternating non-noise and noise spans, starting with non-noise."""
    if length < 2:
        raise ValueError(f"random_spans_noise_mask: length must be >= 2, got {length}")
    noise, spans = _num_noise(length, noise_density, mean_span_length)
    mask = torch.zeros(length, dtype=torch.bool)
    pos = 0
    for keep, hide in zip(_segments(length - noise, spans, generator), _segments(noise, spans, generator)):
        pos += keep
        mask[pos:pos + hide] = True
        pos += hide
    return mask


def _check_density(who: str, noise_density: float, mean_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"{who}: noise_density must be in (0, 1), got {noise_density!r}")
    if not mean_span_length > 0:
        raise ValueError(f"{who}: mean_span_length must be > 0, got {mean_span_length!r}")


def _pad(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _batch(inputs: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int) -> dict:
    ids = _pad(inputs, pad_id)  # (B, M)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(inputs):
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": _pad(labels, IGNORE_INDEX)}  # labels (B, N)


class SpanCorruptionCollator:
    """T5 span corruption of blocks (see the module docstring). ``tokenizer`` must hold EOS and the
    sentinels ``<extra_id_0>`` ... (as many as a block has spans); ``collator(features, generator)``."""

    def __init__(self, tokenizer, noise_density: float = 0.15, mean_span_length: float = 3.0):
        who = "SpanCorruptionCollator"
        _check_density(who, noise_density, mean_span_length)
        vocab = tokenizer._tok.get_vocab()
        self.sentinels = []
        while SENTINEL.format(len(self.sentinels)) in vocab:
            self.sentinels.append(vocab[SENTINEL.format(len(self.sentinels))])
        if not self.sentinels or tokenizer.eos_token_id is None:
            raise ValueError(f"{who}: span corruption needs a tokenizer with an EOS token and the sentinel tokens "
                             f"{SENTINEL.format(0)}, {SENTINEL.format(1)}, ... (the tokenizer has "
                             f"{len(self.sentinels)} sentinels; train one with train_bpe(..., "
                             f"special_tokens=span_corruption_specials()))")
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def __call__(self, features: Sequence[dict], generator: Optional[torch.Generator] = None) -> dict:
        inputs, labels = [], []
        for f in features:
            ids = list(f["input_ids"])
            spans = _num_noise(len(ids), self.noise_density, self.mean_span_length)[1]
            if spans > len(self.sentinels):
                raise ValueError(f"SpanCorruptionCollator: a block of {len(ids)} tokens has {spans} noise spans but "
                                 f"the tokenizer has only {len(self.sentinels)} sentinels; use shorter blocks")
            noise = random_spans_noise_mask(len(ids), self.noise_density, self.mean_span_length, generator).tolist()
            x, y, k = [], [], -1
            for i, (t, hidden) in enumerate(zip(ids, noise)):
                if hidden and (i == 0 or not noise[i - 1]):  # a noise span starts: its sentinel
                    k += 1
                    x.append(self.sentinels[k])
                    y.append(self.sentinels[k])
                (y if hidden else x).append(t)
            inputs.append(x + [self.eos])
            labels.append(y + [self.eos])
        return _batch(inputs, labels, self.pad)


class TextInfillingCollator:
    """BART text infilling of blocks ending in EOS (see the module docstring). ``tokenizer`` must hold
    ``<mask>`` and EOS; ``collator(features, generator)``."""

    def __init__(self, tokenizer, noise_density: float = 0.3, mean_span_length: float = 3.0,
                 permute_sentences: bool = False):
        who = "TextInfillingCollator"
        _check_density(who, noise_density, mean_span_length)
        if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"{who}: text infilling needs a tokenizer with a <mask> and an EOS token (train one "
                             f"with train_bpe(..., special_tokens=text_infilling_specials()))")
        self.mask, self.eos, self.pad = tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.permute_sentences = permute_sentences
        # tokens that end a sentence (byte-level BPE tokens keep the punctuation as text)
        self.full_stops = {i for t, i in tokenizer._tok.get_vocab().items()
                           if t.rstrip("ĠĊ ").endswith((".", "!", "?"))}

    def _permute(self, body: list[int], generator) -> list[int]:
        sentences, start = [], 0
        for i, t in enumerate(body):
            if t in self.full_stops:
                sentences.append(body[start:i + 1])
                start = i + 1
        if start < len(body):
            sentences.append(body[start:])
        order = torch.randperm(len(sentences), generator=generator).tolist()
        return [t for j in order for t in sentences[j]]

    def _span_lengths(self, num_mask: int, generator) -> list[int]:
        """Poisson span lengths summing to num_mask (the last one cut), in random order."""
        lengths: list[int] = []
        while sum(lengths) < num_mask:
            draw = torch.poisson(torch.full((max(num_mask // 2, 4),), float(self.mean_span_length)),
                                 generator=generator).long().tolist()
            lengths += draw
        total, out = 0, []
        for n in lengths:
            if total >= num_mask:
                break
            out.append(min(n, num_mask - total))
            total += out[-1]
        order = torch.randperm(len(out), generator=generator).tolist()
        return [out[j] for j in order]

    def noise(self, ids: Sequence[int], generator: Optional[torch.Generator] = None) -> list[int]:
        """The noised copy of one block (its final token, EOS, is never masked)."""
        body, tail = list(ids[:-1]), list(ids[-1:])
        if self.permute_sentences:
            body = self._permute(body, generator)
        if not body:
            return body + tail
        num_mask = math.ceil(len(body) * self.noise_density)
        lengths = self._span_lengths(num_mask, generator)
        keep = len(body) - num_mask
        while len(lengths) > keep + 1:  # (tiny blocks only) spans must be separated by kept tokens
            lengths[-2] += lengths.pop()
        cuts = torch.randperm(keep + 1, generator=generator)[:len(lengths)].sort().values.tolist()
        out, pos, kept = [], 0, 0  # pos: in body; kept: kept tokens copied so far
        for cut, n in zip(cuts, lengths):
            out += body[pos:pos + cut - kept]
            pos += cut - kept
            kept = cut
            out.append(self.mask)
            pos += n
        return out + body[pos:] + tail

    def __call__(self, features: Sequence[dict], generator: Optional[torch.Generator] = None) -> dict:
        blocks = [list(f["input_ids"]) for f in features]
        return _batch([self.noise(b, generator) for b in blocks], blocks, self.pad)


def span_corruption_specials() -> list[str]:
    """The special tokens a span-corruption tokenizer needs besides EOS: ``<pad>`` and the sentinels, the
    last one added first (so ``<extra_id_0>`` gets the highest id, as in T5's vocabularies)."""
    return ["<pad>"] + [SENTINEL.format(k) for k in reversed(range(NUM_SENTINELS))]


def text_infilling_specials() -> list[str]:
    """The special tokens a text-infilling tokenizer needs besides EOS: ``<pad>`` and ``<mask>``."""
    return ["<pad>", "<mask>"]


def seq2seq_lm_features(texts: Sequence[str], tokenizer, *, objective: str, block_size: int,
                        noise_density: float, mean_span_length: float) -> list[dict]:
    """Pretraining blocks for ``objective`` "span" (blocks whose corrupted input, EOS included, is
    ``block_size`` tokens) or "denoise" (``block_size`` tokens, the last one EOS); documents are joined
    with EOS."""
    docs = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    eos = tokenizer.eos_token_id
    if objective == "span":
        length = span_corruption_block_length(block_size, noise_density, mean_span_length)
        return [{"input_ids": row} for row in pack_blocks(docs, length, eos_id=eos).tolist()]
    if objective == "denoise":
        return [{"input_ids": row + [eos]} for row in pack_blocks(docs, block_size - 1, eos_id=eos).tolist()]
    raise ValueError(f"seq2seq_lm_features: objective must be 'span' or 'denoise', got {objective!r}")
