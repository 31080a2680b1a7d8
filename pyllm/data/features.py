"""Turn loaded examples into model features (lists of token ids and targets).

One builder per objective/task; each returns a list of dicts that
:func:`pyllm.data.collate.pad_batch` can batch. Extra keys (QA offsets) ride
along for evaluation and are ignored by the collators.
"""

from __future__ import annotations

from typing import Sequence

from .collate import IGNORE_INDEX, pack_blocks


def lm_features(texts: Sequence[str], tokenizer, *, objective: str, block_size: int) -> list[dict]:
    """Pretraining blocks of exactly ``block_size`` tokens.

    clm: documents joined with ``<|endoftext|>`` and cut into blocks.
    mlm: the same with room for ``[CLS] ... [SEP]`` around each block.
    """
    encs = tokenizer.encode_batch(texts, add_special_tokens=False)
    docs = [e.ids for e in encs]
    if objective == "clm":
        blocks = pack_blocks(docs, block_size, eos_id=tokenizer.eos_token_id)
        return [{"input_ids": row} for row in blocks.tolist()]
    if objective == "mlm":
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("lm_features: MLM needs a tokenizer with [CLS] and [SEP] (a WordPiece tokenizer)")
        blocks = pack_blocks(docs, block_size - 2, eos_id=tokenizer.sep_token_id)
        return [
            {"input_ids": [tokenizer.cls_token_id, *row, tokenizer.sep_token_id], "token_type_ids": [0] * block_size}
            for row in blocks.tolist()
        ]
    raise ValueError(f"lm_features: objective must be 'clm' or 'mlm', got {objective!r}")


def classification_features(rows: Sequence[dict], tokenizer, label_to_id: dict, *, max_length: int) -> list[dict]:
    """``{"text", "label"[, "text_pair"]}`` rows -> ids, type ids and an integer label."""
    has_pair = any("text_pair" in r for r in rows)
    texts = [r["text"] for r in rows]
    pairs = [r.get("text_pair", "") for r in rows] if has_pair else None
    encs = tokenizer.encode_batch(texts, pairs, max_length=max_length)
    return [
        {"input_ids": e.ids, "token_type_ids": e.type_ids, "labels": label_to_id[r["label"]]}
        for e, r in zip(encs, rows)
    ]


def token_classification_features(sentences: Sequence[dict], tokenizer, tag_to_id: dict, *,
                                  max_length: int) -> list[dict]:
    """CoNLL sentences -> subword ids with one tag per word (on its first subword;
    the other subwords and the special tokens get -100 and carry no loss)."""
    encs = tokenizer.encode_batch([s["tokens"] for s in sentences], max_length=max_length, is_pretokenized=True)
    out = []
    for e, s in zip(encs, sentences):
        labels, previous = [], None
        for w in e.word_ids:
            labels.append(IGNORE_INDEX if w is None or w == previous else tag_to_id[s["tags"][w]])
            previous = w
        out.append({"input_ids": e.ids, "token_type_ids": e.type_ids, "labels": labels})
    return out


def qa_features(examples: Sequence[dict], tokenizer, *, max_length: int) -> list[dict]:
    """SQuAD questions -> ``[CLS] question [SEP] context [SEP]`` with the answer's
    token span as ``start_positions``/``end_positions``.

    The answer's character span is mapped to tokens with the tokenizer's offsets
    (relative to the context, since the context is the second sequence). When the
    context is cut short and the answer falls outside, both positions point at
    [CLS] (index 0), the SQuAD 2.0 "no answer" convention. Each feature keeps the
    context offsets for turning predicted spans back into text.
    """
    encs = tokenizer.encode_batch(
        [x["question"] for x in examples], [x["context"] for x in examples],
        max_length=max_length, truncation="only_second",
    )
    out = []
    for e, x in zip(encs, examples):
        ctx = [i for i, s in enumerate(e.sequence_ids) if s == 1]
        if not ctx:
            raise ValueError(
                f"qa_features: question {x['id']} leaves no room for its context within max_length={max_length}"
            )
        start = end = 0
        if x["answers"]:
            a = x["answers"][0]
            c0, c1 = a["answer_start"], a["answer_start"] + len(a["text"])
            if e.offsets[ctx[0]][0] <= c0 and e.offsets[ctx[-1]][1] >= c1:
                start = next(i for i in ctx if e.offsets[i][1] > c0)
                end = next(i for i in reversed(ctx) if e.offsets[i][0] < c1)
        offsets = [e.offsets[i] if s == 1 else None for i, s in enumerate(e.sequence_ids)]
        out.append({
            "input_ids": e.ids, "token_type_ids": e.type_ids,
            "start_positions": start, "end_positions": end,
            "offsets": offsets, "example_id": x["id"],
        })
    return out
