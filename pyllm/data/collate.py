"""Batching: padding with attention masks, MLM masking, causal-LM packing (into blocks, or documents
end to end with ``cu_seqlens``: :class:`PackedCollator`).

Features are plain dicts of Python lists/ints (what the feature builders in
:mod:`pyllm.data.features` produce); collation turns a list of them into a dict
of LongTensors with the names the models take (``input_ids``,
``attention_mask``, ``token_type_ids``, ``labels``, ``start_positions``,
``end_positions``).
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100  # cross_entropy's ignore_index: positions that carry no loss


def pad_batch(features: Sequence[dict], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a list of features to the longest one.

    ``input_ids`` pads with ``pad_id``; ``attention_mask`` is 1 on real tokens and 0
    on padding; ``token_type_ids`` pads with 0; list-valued ``labels`` (token tags)
    pad with -100; scalar ``labels``/``start_positions``/``end_positions`` stack.
    """
    if not features:
        raise ValueError("pad_batch: got an empty list of features")
    lengths = [len(f["input_ids"]) for f in features]
    seq = max(lengths)
    if pad_to_multiple_of:
        seq = -(-seq // pad_to_multiple_of) * pad_to_multiple_of
    b = len(features)
    input_ids = torch.full((b, seq), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((b, seq), dtype=torch.long)  # (B, T)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in features[0]:
        out["token_type_ids"] = torch.zeros((b, seq), dtype=torch.long)
    token_labels = "labels" in features[0] and isinstance(features[0]["labels"], (list, tuple))
    if token_labels:
        out["labels"] = torch.full((b, seq), IGNORE_INDEX, dtype=torch.long)
    for i, (f, n) in enumerate(zip(features, lengths)):
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, :n] = torch.as_tensor(f["token_type_ids"], dtype=torch.long)
        if token_labels:
            out["labels"][i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
    for key in ("labels", "start_positions", "end_positions"):
        if key in features[0] and not (key == "labels" and token_labels):
            out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)  # (B,)
    return out


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick ``probability`` of the non-special tokens; of those,
    80% become ``[MASK]``, 10% a random token, 10% stay. Returns
    ``(masked_input_ids, labels)``, labels -100 where nothing was picked.

    input_ids: (B, T) LongTensor; not modified.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mask_tokens: probability must be in (0, 1), got {probability}")
    labels = input_ids.clone()
    special = torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=torch.long))
    probs = torch.full(input_ids.shape, probability)
    probs.masked_fill_(special, 0.0)
    picked = torch.bernoulli(probs, generator=generator).bool()  # (B, T)
    labels[~picked] = IGNORE_INDEX
    masked = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & picked
    masked[to_mask] = mask_id
    # Half of the remaining 20% -> random token; the other half keep the original.
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & picked & ~to_mask
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=torch.long)
    masked[to_random] = random_ids[to_random]
    return masked, labels


class MLMCollator:
    """Pads features and masks them for masked-language modelling.

    Call with a ``torch.Generator`` to make the masks reproducible (the trainer
    seeds one per batch from (seed, epoch, step), so a resumed run masks the same
    tokens as an uninterrupted one).
    """

    def __init__(self, tokenizer, probability: float = 0.15):
        if tokenizer.mask_token_id is None:
            raise ValueError("MLMCollator: the tokenizer has no [MASK] token (train a 'wordpiece' tokenizer for MLM)")
        self.tokenizer = tokenizer
        self.probability = probability

    def __call__(self, features: Sequence[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(features, self.tokenizer.pad_token_id)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"],
            mask_id=self.tokenizer.mask_token_id,
            vocab_size=self.tokenizer.vocab_size,
            special_ids=self.tokenizer.all_special_ids,
            probability=self.probability,
            generator=generator,
        )
        return batch


class PadCollator:
    """Pads features (fine-tuning batches, or MLM/CLM without masking)."""

    def __init__(self, pad_id: int, *, copy_labels: bool = False):
        self.pad_id = pad_id
        self.copy_labels = copy_labels  # causal LM: labels are the inputs (the model shifts them)

    def __call__(self, features: Sequence[dict], generator: torch.Generator | None = None) -> dict:
        batch = pad_batch(features, self.pad_id)
        if self.copy_labels:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch


class PackedCollator:
    """Causal-LM batches without padding (FlashAttention's varlen layout): the documents of a batch are laid
    end to end in one row, and ``cu_seqlens`` marks where each starts, so attention never crosses a document.

    features: dicts with ``input_ids`` (one document each, e.g. :func:`pyllm.data.features.document_features`).
    Returns ``input_ids`` (1, T) with T the total token count, ``labels`` (1, T) (the inputs, with -100 on
    each document's first token so no document predicts the next one's start), ``position_ids`` (1, T)
    restarting at 0 per document, and ``cu_seqlens`` (documents + 1,) int32. The loss equals the per-document
    losses taken together (every predicted token counted once).
    """

    def __call__(self, features: Sequence[dict], generator: torch.Generator | None = None) -> dict:
        if not features:
            raise ValueError("PackedCollator: got an empty list of features")
        docs = [list(f["input_ids"]) for f in features]
        if any(len(d) == 0 for d in docs):
            raise ValueError("PackedCollator: a document has no tokens")
        lengths = torch.tensor([len(d) for d in docs])
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        input_ids = torch.tensor([t for d in docs for t in d], dtype=torch.long)[None]  # (1, T)
        starts = cu_seqlens[:-1].long()
        labels = input_ids.clone()
        labels[0, starts] = IGNORE_INDEX
        positions = torch.arange(input_ids.shape[1]) - torch.repeat_interleave(starts, lengths)
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions[None], "cu_seqlens": cu_seqlens}


def pack_blocks(docs: Sequence[Sequence[int]], block_size: int, *, eos_id: int | None = None) -> torch.Tensor:
    """Causal-LM packing: join the documents (each followed by ``eos_id``) into one
    stream and cut it into blocks of ``block_size`` tokens; the tail that does not
    fill a block is dropped. Returns (num_blocks, block_size) LongTensor.

    No padding, so every position trains and every batch has the same token count
    (which is also what makes data-parallel losses equal to single-process ones).
    """
    if block_size < 2:
        raise ValueError(f"pack_blocks: block_size must be >= 2, got {block_size}")
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        if eos_id is not None:
            stream.append(eos_id)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(
            f"pack_blocks: the corpus has {len(stream)} tokens, fewer than one block of {block_size}; "
            "use more text or a smaller block_size"
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)  # (N, block)
