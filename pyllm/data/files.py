"""Readers for user data: text corpora, labelled sets, CoNLL tags, SQuAD-style QA.

Every reader returns plain Python lists of dicts and fails early and in words:
a missing path, an empty file, a malformed line (the message names the file and
the line number) or a label outside the label set.

Formats
-------
* text corpus: a ``.txt`` file (one document), a ``.jsonl`` file (one JSON object
  per line with a string field ``text``), or a folder holding such files (read
  recursively, in sorted order).
* labelled set: ``.jsonl`` or ``.csv`` with fields ``text`` and ``label`` and an
  optional ``text_pair``.
* token labels: CoNLL -- one ``token ... tag`` per line (the tag is the last
  column), blank lines between sentences, ``-DOCSTART-`` lines ignored.
* extractive QA: SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message says where."""


def _existing(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} does not exist")
    return p


def _read_text(path: Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); anything else is an
    error naming the file."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                        "is it a binary file? Save text data as UTF-8") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a file") from None


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    # split on "\n" only: JSON strings may hold U+2028, which str.splitlines would cut at
    return enumerate(_read_text(path).split("\n"), 1)


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_texts(path) -> list[str]:
    """Documents of a text corpus: a .txt/.jsonl file or a folder of them."""
    p = _existing(path, "read_texts")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"read_texts: folder {p} holds no .txt or .jsonl files")
    else:
        files = [p]
    texts = []
    for f in files:
        if f.suffix == ".jsonl":
            for lineno, obj in _jsonl(f):
                text = obj.get("text")
                if not isinstance(text, str):
                    raise DataError(f"{f}:{lineno}: expected a string field 'text', got {type(text).__name__}")
                if text.strip():
                    texts.append(text)
        elif f.suffix == ".txt":
            text = _read_text(f)
            if text.strip():
                texts.append(text)
        else:
            raise DataError(f"read_texts: {f} is neither .txt nor .jsonl")
    if not texts:
        raise DataError(f"read_texts: {p} holds no text")
    return texts


def _check_label(label, labels, where: str):
    if labels is not None and label not in labels:
        shown = ", ".join(map(str, list(labels)[:20]))
        raise DataError(f"{where}: label {label!r} is not in the label set [{shown}]")


def read_labelled(path, labels: list[str] | None = None) -> list[dict]:
    """Rows ``{"text", "label"[, "text_pair"]}`` of a .jsonl or .csv file.

    Labels are kept as strings (a JSON ``1`` becomes ``"1"``) so that files and
    label lists compare the same way. With ``labels`` given, any other label is
    an error naming the file and line.
    """
    p = _existing(path, "read_labelled")
    if p.suffix not in (".jsonl", ".csv"):
        raise DataError(f"read_labelled: expected a .jsonl or .csv file, got {p}")
    labels = None if labels is None else [str(x) for x in labels]
    rows, spelled = [], {}  # label string -> (the label as written, its line)
    if p.suffix == ".jsonl":
        source = _jsonl(p)
    else:
        reader = csv.DictReader(io.StringIO(_read_text(p), newline=""))
        if reader.fieldnames is None:
            raise DataError(f"read_labelled: {p} is empty")
        missing = {"text", "label"} - set(reader.fieldnames)
        if missing:
            raise DataError(f"{p}:1: the header lacks the column(s) {sorted(missing)} (got {reader.fieldnames})")
        # csv counts the header as line 1; rows start at 2 (multi-line cells aside).
        source = [(reader.line_num, row) for row in reader]
    for lineno, obj in source:
        where = f"{p}:{lineno}"
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: expected a non-empty string field 'text'")
        if label is None or label == "":
            raise DataError(f"{where}: missing field 'label'")
        if isinstance(label, (dict, list)):
            raise DataError(f"{where}: 'label' must be a string or a number, got {type(label).__name__}")
        first = spelled.setdefault(str(label), (label, lineno))
        if type(first[0]) is not type(label):  # 1 and "1" would silently become one class
            raise DataError(f"{where}: label {label!r} here and label {first[0]!r} on line {first[1]} become the "
                            "same class once read; write each label one way (all strings or all numbers)")
        label = str(label)
        _check_label(label, labels, where)
        row = {"text": text, "label": label}
        pair = obj.get("text_pair")
        if pair not in (None, ""):
            if not isinstance(pair, str):
                raise DataError(f"{where}: 'text_pair' must be a string")
            row["text_pair"] = pair
        rows.append(row)
    if not rows:
        raise DataError(f"read_labelled: {p} holds no examples")
    return rows


def read_conll(path, labels: list[str] | None = None) -> list[dict]:
    """Sentences ``{"tokens": [...], "tags": [...]}`` of a CoNLL file."""
    p = _existing(path, "read_conll")
    sentences, tokens, tags = [], [], []
    for lineno, line in _lines(p):
        line = line.strip()
        if not line or line.startswith("-DOCSTART-"):
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        cols = line.split()
        if len(cols) < 2:
            raise DataError(f"{p}:{lineno}: expected 'token ... tag' (at least 2 columns), got {line!r}")
        _check_label(cols[-1], labels, f"{p}:{lineno}")
        tokens.append(cols[0])
        tags.append(cols[-1])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise DataError(f"read_conll: {p} holds no sentences")
    return sentences


def read_squad(path) -> list[dict]:
    """Questions ``{"id", "question", "context", "answers": [{"text", "answer_start"}]}``.

    Each answer must sit in its context at ``answer_start``; one that does not is
    an error naming the question id (a wrong offset would silently teach the model
    the wrong span).
    """
    p = _existing(path, "read_squad")
    try:
        doc = json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"read_squad: {p} must hold an object with a list 'data' (SQuAD format)")
    out = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            context = para.get("context")
            if not isinstance(context, str):
                raise DataError(f"read_squad: {p}: a paragraph lacks a string 'context'")
            for qa in para.get("qas", []):
                qid = qa.get("id", f"#{len(out)}")
                question = qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    raise DataError(f"read_squad: {p}: question {qid} has no text")
                answers = []
                for a in qa.get("answers", []):
                    text, start = a.get("text"), a.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise DataError(
                            f"read_squad: {p}: question {qid}: an answer needs 'text' and int 'answer_start'")
                    if context[start : start + len(text)] != text:
                        raise DataError(
                            f"read_squad: {p}: question {qid}: answer {text!r} is not at offset {start} of its context"
                        )
                    answers.append({"text": text, "answer_start": start})
                out.append({"id": str(qid), "question": question, "context": context, "answers": answers})
    if not out:
        raise DataError(f"read_squad: {p} holds no questions")
    return out
