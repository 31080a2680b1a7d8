"""Evaluation metrics: accuracy, macro-F1, token-level F1, SQuAD exact match / F1."""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions but {len(labels)} labels")
    return sum(p == y for p, y in zip(preds, labels)) / max(1, len(labels))


def f1_per_class(preds: Sequence[int], labels: Sequence[int], classes: Sequence[int]) -> dict:
    tp, fp, fn = collections.Counter(), collections.Counter(), collections.Counter()
    for p, y in zip(preds, labels):
        if p == y:
            tp[y] += 1
        else:
            fp[p] += 1
            fn[y] += 1
    out = {}
    for c in classes:
        denom = 2 * tp[c] + fp[c] + fn[c]
        out[c] = 2 * tp[c] / denom if denom else 0.0
    return out


def macro_f1(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in labels or predictions."""
    present = sorted(set(labels) | set(preds))
    if not present:
        return 0.0
    per = f1_per_class(preds, labels, present)
    return sum(per.values()) / len(per)


def token_f1(preds: Sequence[int], labels: Sequence[int], outside: int | None) -> float:
    """Token-level micro F1 over the tags other than ``outside`` (the "O" tag):
    a token counts as a true positive when its non-O tag is predicted exactly."""
    tp = fp = fn = 0
    for p, y in zip(preds, labels):
        if p == y and y != outside:
            tp += 1
        else:
            if p != outside:
                fp += 1
            if y != outside:
                fn += 1
    return 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0


def _normalize_answer(s: str) -> list[str]:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return s.split()


def squad_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction against its gold answers (best over answers)."""
    if not answers:  # unanswerable: right only when nothing is predicted
        return (float(prediction == ""),) * 2
    pred = _normalize_answer(prediction)
    em = f1 = 0.0
    for a in answers:
        gold = _normalize_answer(a)
        em = max(em, float(pred == gold))
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            f1 = max(f1, 2 * precision * recall / (precision + recall))
    return em, f1
