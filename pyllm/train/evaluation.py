"""Evaluation loops, one per objective or task. Each returns a dict of plain floats.

They all take the (possibly data-parallel-wrapped) model, the evaluation
features, and the trainer's batch size, device and autocast factory; every
process evaluates the whole set, so all of them agree on the metrics (and on
early stopping) without a gather.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from pyllm.data.collate import IGNORE_INDEX, pad_batch

from .metrics import accuracy, macro_f1, squad_scores, token_f1


def _batches(features: Sequence[dict], batch_size: int):
    for start in range(0, len(features), batch_size):
        yield start, features[start : start + batch_size]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_lm(model, features, *, batch_size, device, autocast, collator, causal: bool) -> dict:
    """Token-weighted mean loss and perplexity. MLM masks come from a fixed
    generator, so every evaluation of a run scores the same masked positions."""
    total, count = 0.0, 0
    for b, chunk in _batches(features, batch_size):
        batch = collator(list(chunk), torch.Generator().manual_seed(1_000 + b))
        labels = batch["labels"]
        n = int((labels[:, 1:] != IGNORE_INDEX).sum()) if causal else int((labels != IGNORE_INDEX).sum())
        if n == 0:
            continue
        with autocast():
            loss = model(**_to(batch, device)).loss
        total += float(loss) * n
        count += n
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def _forward_logits(model, chunk, pad_id, device, autocast, keep=("input_ids", "attention_mask", "token_type_ids")):
    batch = pad_batch(list(chunk), pad_id)
    labels = {k: batch.pop(k) for k in ("labels", "start_positions", "end_positions") if k in batch}
    with autocast():
        out = model(**_to({k: v for k, v in batch.items() if k in keep}, device), **_to(labels, device))
    return batch, labels, out


def evaluate_classification(model, features, *, batch_size, device, autocast, pad_id, num_labels) -> dict:
    preds, golds, loss_sum = [], [], 0.0
    for _, chunk in _batches(features, batch_size):
        _, labels, out = _forward_logits(model, chunk, pad_id, device, autocast)
        preds += out.logits.argmax(-1).tolist()
        golds += labels["labels"].tolist()
        loss_sum += float(out.loss) * len(chunk)
    return {
        "loss": loss_sum / len(features),
        "accuracy": accuracy(preds, golds),
        "macro_f1": macro_f1(preds, golds, num_labels),
    }


def evaluate_token_classification(model, features, *, batch_size, device, autocast, pad_id, outside_id) -> dict:
    """Accuracy and micro F1 over the non-"O" tags, on each word's first subword."""
    preds, golds, loss_sum, n_tok = [], [], 0.0, 0
    for _, chunk in _batches(features, batch_size):
        _, labels, out = _forward_logits(model, chunk, pad_id, device, autocast)
        y = labels["labels"]
        keep = y != IGNORE_INDEX
        preds += out.logits.argmax(-1).cpu()[keep].tolist()
        golds += y[keep].tolist()
        k = int(keep.sum())
        loss_sum += float(out.loss) * k
        n_tok += k
    return {
        "loss": loss_sum / max(n_tok, 1),
        "accuracy": accuracy(preds, golds),
        "f1": token_f1(preds, golds, outside_id),
    }


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, offsets, max_answer_tokens: int = 30):
    """The (start, end) context-token pair with the highest start + end score,
    start <= end < start + max_answer_tokens; None when the context is empty."""
    ctx = torch.tensor([o is not None for o in offsets] + [False] * (len(start_logits) - len(offsets)))
    if not bool(ctx.any()):
        return None
    neg = torch.finfo(torch.float32).min / 4
    s = start_logits.float().masked_fill(~ctx, neg)
    e = end_logits.float().masked_fill(~ctx, neg)
    scores = s[:, None] + e[None, :]  # (N, N): start i, end j
    n = scores.shape[0]
    i = torch.arange(n)
    valid = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_tokens)
    scores = scores.masked_fill(~valid, float("-inf"))
    flat = int(scores.argmax())
    return flat // n, flat % n


def span_text(context: str, offsets, span) -> str:
    if span is None:
        return ""
    return context[offsets[span[0]][0] : offsets[span[1]][1]]


def evaluate_qa(model, features, *, batch_size, device, autocast, pad_id, examples) -> dict:
    """SQuAD exact match and F1 (in percent, as SQuAD reports them) per question, its answer the
    best span over the question's windows, plus the span loss per window."""
    loss_sum, logits = 0.0, []
    for _, chunk in _batches(features, batch_size):
        _, _, out = _forward_logits(model, chunk, pad_id, device, autocast)
        loss_sum += float(out.loss) * len(chunk)
        logits += zip(out.start_logits.float().cpu(), out.end_logits.float().cpu())
    answers = best_answers(features, logits, examples)
    golds = {x["id"]: [a["text"] for a in x["answers"]] for x in examples}
    scores = [squad_scores(text, golds[i]) for i, (text, _) in answers.items()]
    n = len(scores)
    return {"loss": loss_sum / len(features), "exact_match": 100 * sum(s[0] for s in scores) / n,
            "f1": 100 * sum(s[1] for s in scores) / n}


def best_answers(features, logits, examples) -> dict:
    """example id -> (answer text, start character; "" and -1 for none): the span with the
    highest start + end score over all the windows (features) of the example."""
    best = {}
    for f, (s, e) in zip(features, logits):
        n = len(f["offsets"])
        span = best_span(s[:n], e[:n], f["offsets"])
        score = float("-inf") if span is None else float(s[span[0]] + e[span[1]])
        if f["example_id"] not in best or score > best[f["example_id"]][0]:
            best[f["example_id"]] = (score, f, span)
    by_id = {x["id"]: x for x in examples}
    out = {}
    for i, (_, f, span) in best.items():
        text = span_text(by_id[i]["context"], f["offsets"], span)
        out[i] = (text, f["offsets"][span[0]][0] if span else -1)
    return out
