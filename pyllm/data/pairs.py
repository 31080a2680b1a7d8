"""Source -> target pairs for translation and summarization: readers, the embedded number set, features.

Formats: ``.jsonl`` (one object per line), ``.tsv`` and ``.csv`` (a header row naming the columns). The
source and target columns are named by the caller (default ``source`` / ``target``). Every problem names
the file, the line and what is wrong: a missing column, an empty source or target, a text over the length
limit.

The embedded default (:func:`number_pairs`) is English number phrases and their French, German or Spanish
translations, both sides written by the ``num2words`` package (cardinals and ordinals, e.g. "three hundred
and twenty-one" -> "trois cent vingt et un", "twenty-first" -> "vingt et unième").
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from .collate import IGNORE_INDEX
from .files import DataError, _existing, _jsonl

NUMBER_LANGUAGES = ("fr", "de", "es")


def _rows(path: Path):
    """(line number, dict) per record of a .jsonl / .tsv / .csv file."""
    if path.suffix == ".jsonl":
        yield from _jsonl(path)
        return
    if path.suffix not in (".tsv", ".csv"):
        raise DataError(f"{path}: expected a .jsonl, .tsv or .csv file of pairs, got {path.suffix or 'no suffix'!r}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        for row in reader:
            yield reader.line_num, row


def read_pairs(path, source_column: str = "source", target_column: str = "target",
               max_chars: Optional[int] = None) -> list[dict]:
    """Read pairs -> ``[{"source", "target", "where": "file:line"}]``; raises DataError naming file and line."""
    path = _existing(path, "read_pairs")
    out = []
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        for role, col in (("source", source_column), ("target", target_column)):
            if col not in row or row[col] is None:
                raise DataError(f"{where}: missing {role} column {col!r} (the record has columns {sorted(row)}); "
                                f"name the columns with --source-column / --target-column")
            if not isinstance(row[col], str) or not row[col].strip():
                raise DataError(f"{where}: empty {role} ({col!r}); every pair needs a non-empty source and target")
            if max_chars is not None and len(row[col]) > max_chars:
                raise DataError(f"{where}: {role} ({col!r}) has {len(row[col])} characters, over the limit of "
                                f"{max_chars}")
        out.append({"source": row[source_column].strip(), "target": row[target_column].strip(), "where": where})
    if not out:
        raise DataError(f"{path}: no pairs found (empty file?)")
    return out


def number_pairs(language: str = "fr", n: int = 6000, seed: int = 0, max_number: int = 9999) -> list[dict]:
    """English number phrases -> `language` (fr, de, es), by num2words: n distinct pairs, cardinals for
    numbers drawn from [0, max_number] and ordinals for [1, 199], in a seeded random order."""
    if language not in NUMBER_LANGUAGES:
        raise ValueError(f"number_pairs: language must be one of {NUMBER_LANGUAGES}, got {language!r}")
    try:
        from num2words import num2words
    except ImportError:
        raise ImportError("the embedded translation set needs the num2words package: pip install num2words "
                          "(or pip install 'pyllm[seq2seq]')") from None
    rng = random.Random(seed)
    items = [(k, "cardinal") for k in range(max_number + 1)] + [(k, "ordinal") for k in range(1, 200)]
    rng.shuffle(items)
    out, seen = [], set()
    for k, kind in items:
        src = num2words(k, lang="en", to=kind)
        if src in seen:
            continue
        seen.add(src)
        out.append({"source": src, "target": num2words(k, lang=language, to=kind),
                    "where": f"num2words:{language}:{kind}:{k}"})
        if len(out) == n:
            break
    return out


def seq2seq_features(examples: Sequence[dict], tokenizer, *, max_source_length: int, max_target_length: int,
                     truncate: bool = False) -> list[dict]:
    """Token ids: ``input_ids`` = source + EOS, ``labels`` = target + EOS. A side over its limit raises
    naming the example's file and line (or is cut, with truncate=True: summarization sources)."""
    eos = tokenizer.eos_token_id
    srcs = tokenizer.encode_batch([e["source"] for e in examples], add_special_tokens=False)
    tgts = tokenizer.encode_batch([e["target"] for e in examples], add_special_tokens=False)
    feats = []
    for e, s, t in zip(examples, srcs, tgts):
        s, t = s.ids + [eos], t.ids + [eos]
        for role, ids, limit in (("source", s, max_source_length), ("target", t, max_target_length)):
            if len(ids) > limit and not truncate:
                raise DataError(f"{e.get('where', '?')}: {role} is {len(ids)} tokens (with EOS), over the limit of "
                                f"{limit} (--max-length for sources, --max-target-length for targets)")
        feats.append({"input_ids": s[:max_source_length - 1] + [eos] if len(s) > max_source_length else s,
                      "labels": t[:max_target_length - 1] + [eos] if len(t) > max_target_length else t})
    return feats


class Seq2SeqCollator:
    """Right-pads ``input_ids`` with pad_id (``attention_mask`` 0) and ``labels`` with -100 (ignored by the
    loss; the model builds decoder_input_ids by shifting them right)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict], generator: Optional[torch.Generator] = None) -> dict:
        B = len(features)
        M = max(len(f["input_ids"]) for f in features)
        N = max(len(f["labels"]) for f in features)
        ids = torch.full((B, M), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, M, dtype=torch.long)
        labels = torch.full((B, N), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
            labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
