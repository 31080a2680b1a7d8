"""Turn loaded examples into model features (lists of token ids and targets).

One builder per objective/task; each returns a list of dicts that
:func:`pyllm.data.collate.pad_batch` can batch. Extra keys (QA offsets) ride
along for evaluation and are ignored by the collators.
"""

from __future__ import annotations

import warnings
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


def document_features(texts: Sequence[str], tokenizer, *, max_length: int) -> list[dict]:
    """Causal-LM features for :class:`pyllm.data.PackedCollator`: one per document (its tokens and
    ``<|endoftext|>``), documents longer than ``max_length`` cut into pieces of at most ``max_length``."""
    if max_length < 2:
        raise ValueError(f"document_features: max_length must be >= 2, got {max_length}")
    out = []
    for e in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = e.ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        out += [{"input_ids": ids[i:i + max_length]} for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
    return out


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


def qa_features(examples: Sequence[dict], tokenizer, *, max_length: int, stride: int | None = None) -> list[dict]:
    """SQuAD questions -> ``[CLS] question [SEP] context window [SEP]`` features with the
    answer's token span as ``start_positions``/``end_positions``.

    A context longer than the room ``max_length`` leaves is cut into windows that overlap by
    ``stride`` tokens (default: a quarter of ``max_length``), one feature per window, all with
    the question's ``example_id``: evaluation and prediction take the best span over an
    example's windows. The answer's character span is mapped to tokens with the tokenizer's
    offsets; a window that does not hold the whole answer has both positions at [CLS]
    (index 0), the SQuAD 2.0 "no answer" convention. Each feature keeps its context offsets
    (``None`` off the context) for turning predicted spans back into text.

    A question longer than half of ``max_length`` (less the 3 special tokens) is cut to that
    many tokens so its context keeps the other half; a warning counts the questions cut.
    """
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError("qa_features: question answering needs a tokenizer with [CLS] and [SEP] (a BERT one)")
    questions = _cap_questions(examples, tokenizer, max_length)
    q_encs = tokenizer.encode_batch(questions, add_special_tokens=False)
    c_encs = tokenizer.encode_batch([x["context"] for x in examples], add_special_tokens=False)
    stride = max_length // 4 if stride is None else stride
    out = []
    for q, c, x in zip(q_encs, c_encs, examples):
        room = max_length - 3 - len(q.ids)  # >= 1: _cap_questions keeps half for the context
        step = max(1, room - min(stride, room - 1))
        answer = None
        if x["answers"]:
            a = x["answers"][0]
            answer = (a["answer_start"], a["answer_start"] + len(a["text"]))
        head = [tokenizer.cls_token_id, *q.ids, tokenizer.sep_token_id]
        for a in range(0, max(1, len(c.ids) - room + step), step):
            ids, offs = c.ids[a : a + room], c.offsets[a : a + room]
            start = end = 0
            if answer and offs and offs[0][0] <= answer[0] and offs[-1][1] >= answer[1]:
                start = len(head) + next(i for i, o in enumerate(offs) if o[1] > answer[0])
                end = len(head) + max(i for i, o in enumerate(offs) if o[0] < answer[1])
            out.append({
                "input_ids": [*head, *ids, tokenizer.sep_token_id],
                "token_type_ids": [0] * len(head) + [1] * (len(ids) + 1),
                "start_positions": start, "end_positions": end,
                "offsets": [None] * len(head) + [tuple(o) for o in offs] + [None], "example_id": x["id"],
            })
    return out


def _cap_questions(examples: Sequence[dict], tokenizer, max_length: int) -> list[str]:
    """Questions, each cut to at most half the room [CLS] q [SEP] c [SEP] leaves in max_length."""
    room = max_length - 3
    cap = room - max(1, room // 2)
    if cap < 1:
        raise ValueError(f"qa_features: max_length={max_length} leaves no room for a question and its context "
                         "(need at least 5 tokens)")
    out, cut = [], 0
    for x, e in zip(examples, tokenizer.encode_batch([x["question"] for x in examples], add_special_tokens=False)):
        q = x["question"]
        if len(e.ids) > cap:
            q, cut = q[: e.offsets[cap - 1][1]], cut + 1
        out.append(q)
    if cut:
        warnings.warn(f"qa_features: {cut} of {len(examples)} questions were longer than max_length={max_length} "
                      f"allows ({cap} tokens, half of what the special tokens leave) and were truncated to "
                      f"their first {cap} tokens", stacklevel=3)
    return out
