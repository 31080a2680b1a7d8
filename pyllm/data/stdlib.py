"""The embedded default data: docstrings of Python's own standard library.

pyllm ships no data files. Instead, the first time it needs text it reads the
source files of the standard library that runs it (``sysconfig.get_paths()["stdlib"]``)
with :mod:`ast` -- no module is imported -- and keeps every module, class and
function docstring. The files are visited in sorted order and each file's nodes
in source order, so the corpus is the same on every run of the same Python.
The result is cached as JSON lines under ``~/.cache/pyllm`` (``$PYLLM_CACHE``
overrides), written to a temporary file first and then renamed, so a crash or
a concurrent run never leaves half a cache behind.

Two views of the same records:

* :func:`stdlib_corpus` -- a list of docstrings, for language-model pretraining.
* :func:`stdlib_topics` -- (text, label) examples where the label is the
  top-level package or module the docstring documents (``email``, ``asyncio``,
  ``tkinter`` ...): a topic-classification task over real English prose, with a
  fixed train/validation split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

# Folders that hold tests or third-party code rather than the library itself.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_MIN_CHARS = 40  # shorter docstrings are mostly "Return x." and teach little


def cache_dir() -> Path:
    """The folder pyllm caches built data in (``$PYLLM_CACHE`` or ``~/.cache/pyllm``)."""
    root = os.environ.get("PYLLM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "pyllm"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.Module):
    """Yield (qualified name, docstring) in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "", doc

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    yield name, doc
                yield from visit(child, name + ".")

    yield from visit(tree, "")


def _records_from_files(root: Path, files: list[Path]) -> list[dict]:
    records = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. lib2to3 test data written in Python 2 on purpose
        top = rel.split("/", 1)[0]
        package = top[:-3] if top.endswith(".py") else top
        for name, doc in _docstrings(tree):
            if len(doc) >= _MIN_CHARS:
                records.append({"file": rel, "name": name, "package": package, "text": doc})
    return records


def _atomic_write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def stdlib_records(max_files: int | None = None, *, use_cache: bool = True) -> list[dict]:
    """All docstring records of the running Python's standard library.

    Each record is ``{"file", "name", "package", "text"}``. ``max_files`` keeps
    only the first N source files of the sorted list (for tests); such partial
    builds are cached under their own name.
    """
    root = stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib_records: the standard library folder {root} does not exist")
    files = _source_files(root)
    if max_files is not None:
        if max_files < 1:
            raise ValueError(f"stdlib_records: max_files must be >= 1, got {max_files}")
        files = files[:max_files]
    if not files:
        raise FileNotFoundError(f"stdlib_records: no .py files under {root}")
    # The key covers the interpreter version, the folder and the file list, so a
    # different Python (or a partial build) never reads another one's cache.
    key = hashlib.sha256(
        "\n".join([sys.version, str(root), str(_MIN_CHARS)] + [f.relative_to(root).as_posix() for f in files]).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"stdlib-docstrings-{sys.version_info[0]}.{sys.version_info[1]}-{key}.jsonl"
    if use_cache and path.is_file():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    records = _records_from_files(root, files)
    if use_cache:
        try:
            _atomic_write_lines(path, records)
        except OSError as e:  # a read-only home must not stop training
            warnings.warn(f"pyllm: could not cache the stdlib corpus at {path}: {e}")
    return records


def stdlib_corpus(max_files: int | None = None) -> list[str]:
    """The docstrings of the standard library, one string each, in a fixed order."""
    return [r["text"] for r in stdlib_records(max_files)]


def stdlib_topics(
    num_labels: int = 10,
    *,
    max_per_label: int = 250,
    min_per_label: int = 20,
    validation_fraction: float = 0.2,
    max_files: int | None = None,
) -> tuple[list[dict], list[dict], list[str]]:
    """A topic-classification task: which stdlib package does this docstring document?

    Keeps the ``num_labels`` packages with the most docstrings (at least
    ``min_per_label`` each), takes at most ``max_per_label`` docstrings from each
    (evenly spread over the package, so the classes are roughly balanced), and
    splits every class the same way: every k-th example goes to validation.

    Returns ``(train, validation, labels)``: lists of ``{"text", "label"}`` and
    the sorted label names.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"stdlib_topics: validation_fraction must be in (0, 1), got {validation_fraction}")
    by_package: dict[str, list[str]] = {}
    for r in stdlib_records(max_files):
        by_package.setdefault(r["package"], []).append(r["text"])
    # Most docstrings first; ties broken by name so the choice is fixed.
    ranked = sorted(by_package.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    # Private modules (_pydecimal, _pyio) duplicate public ones; leave them out.
    chosen = [(n, t) for n, t in ranked if len(t) >= min_per_label and not n.startswith("_")][:num_labels]
    if len(chosen) < 2:
        raise ValueError(
            f"stdlib_topics: need at least 2 packages with >= {min_per_label} docstrings, "
            f"found {len(chosen)} (max_files={max_files})"
        )
    labels = sorted(name for name, _ in chosen)
    every = max(2, round(1 / validation_fraction))
    train, validation = [], []
    for name, texts in sorted(chosen):
        if len(texts) > max_per_label:  # evenly spaced picks, not the first N (one module)
            step = len(texts) / max_per_label
            texts = [texts[int(i * step)] for i in range(max_per_label)]
        for i, text in enumerate(texts):
            (validation if i % every == every - 1 else train).append({"text": text, "label": name})
    return train, validation, labels
