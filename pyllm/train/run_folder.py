"""Run folders written as transactions.

A training run never edits its output folder ``T`` while it has nothing to keep:

1. **Check first.** Before anything is written: ``T`` is a folder pyllm may write into (absent,
   empty, or a pyllm run with ``overwrite``), no input of the run (``model``, ``tokenizer``,
   ``init_from``, data files) is something ``--overwrite`` would replace, a resumed run's
   checkpoint reads as one, and the parent folder is writable.
2. **Stage.** The run writes into a hidden sibling, ``.<name>.pyllm-run-<pid>``, on the same
   file system.
3. **Publish** when there is something to keep -- the first checkpoint (written together with a
   loadable model), an interrupted run's checkpoint once a step is done, or the end. A new folder is renamed into
   place. Over an old run, the entries of ``T`` that the old run did not write (its manifest,
   the ``files`` list of ``pyllm_run.json``) are hard-linked into the stage, and the stage and
   ``T`` are exchanged in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames,
   and the next run restores ``T`` if a crash fell between them); the old run is then deleted.
   From then on the stage's name is a link to ``T``: the run goes on writing there, every file
   replaced atomically, so ``T`` always holds a loadable, resumable run.
4. **Close.** A run that fails before publishing deletes its stage; ``T`` is as it was.

``--resume`` continues the run in ``T`` itself (every write is atomic). Stages left by killed
processes are deleted by the next run into the same folder.

The interface is three calls, made by :mod:`pyllm.train.api`: ``transaction()`` around a job,
``open_run(cfg, command)`` (returns the folder to write in) and ``publish()`` (the trainer's
checkpoint hook).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from .checkpoint import CHECKPOINT, LEGACY_CHECKPOINT, has_checkpoint, load_checkpoint

RUN_MARKER = "pyllm_run.json"
# What a run writes (the manifest of runs from before manifests existed).
RUN_FILES = frozenset({RUN_MARKER, "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                       "pyllm_task.json", "metrics.jsonl", "loss_curve.png", CHECKPOINT, LEGACY_CHECKPOINT,
                       "base-model"})
# Inputs a run reads, by config field.
INPUT_FIELDS = ("model", "tokenizer", "init_from", "train_file", "validation_file")
# Half-written files of an atomic write, and the stages of nested runs (a fine-tune's base model).
_TEMP = re.compile(r"^\.pyllm-|\.tmp(\.png)?$|^\..*\.pyllm-(run|old)-\d+$")


class RunFolder:
    """One run's output folder ``target`` and the folder it writes in (``work``)."""

    def __init__(self, target: Path, command: str, *, overwrite: bool, resume: bool, config: dict):
        self.target = Path(os.path.abspath(target))  # "." and "runs/.." have a name and a parent too
        self.command = command
        self.overwrite, self.resume = overwrite, resume
        self.config = config
        self.published = resume  # a resumed run writes in place
        self.work = self.target if resume else self.target.parent / f".{self.target.name}.pyllm-run-{os.getpid()}"

    # -- 1. check -----------------------------------------------------------------------------

    def check(self) -> None:
        t, cmd = self.target, self.command
        _recover(t)
        if t.exists() and not t.is_dir():
            raise FileExistsError(f"{cmd}: output_dir {t} exists and is not a folder")
        held = sorted(p.name for p in t.iterdir()) if t.is_dir() else []
        if self.resume:
            if not has_checkpoint(t) and not (t / LEGACY_CHECKPOINT).is_file():
                raise FileNotFoundError(f"{cmd}: cannot resume: {t} holds no {CHECKPOINT}")
            load_checkpoint_header(t)
            return
        if held:
            if not (t / RUN_MARKER).is_file():
                raise FileExistsError(
                    f"{cmd}: output_dir {t} already holds files that pyllm did not write ({held[:6]}); "
                    "choose another output_dir (pyllm never deletes files it did not write)")
            if not self.overwrite:
                prev = _read_marker(t).get("command", "?")
                raise FileExistsError(
                    f"{cmd}: output_dir {t} already holds a '{prev}' run; pass --overwrite "
                    "(overwrite=True) to replace it, --resume to continue it, or choose another --output-dir")
            owned = manifest(t)
            clash = sorted(n for n in held if n in RUN_FILES and n not in owned)
            if clash:
                raise FileExistsError(f"{cmd}: output_dir {t} holds {clash}, which this run would write but an "
                                      "earlier pyllm run did not; move them away first")
            self._check_inputs(owned)
        cwd = Path.cwd().resolve()
        if t.is_dir() and (cwd == t.resolve() or t.resolve() in cwd.parents):
            raise ValueError(f"{cmd}: output_dir {t} holds the current folder; a run replaces its folder as a whole "
                             "when it moves into place, which would leave this shell in a deleted folder. Run "
                             "from outside it (cd ..) or choose another --output-dir")
        parent = t.parent
        if not parent.exists():
            _mkdir(parent, cmd)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"{cmd}: cannot write in {parent} (Permission denied), where the run folder "
                                  f"{t.name} and its staging folder go")

    def _check_inputs(self, owned: set) -> None:
        """--overwrite must not remove what the run reads."""
        t = self.target.resolve()
        for key in INPUT_FIELDS:
            value = self.config.get(key)
            if not value:
                continue
            p = Path(value).resolve()
            if p == t or t in p.parents and p.relative_to(t).parts[0] in owned:
                where = "is the output folder" if p == t else "lies in the output folder, among the files of its run"
                raise ValueError(f"{self.command}: --{key.replace('_', '-')} {value} {where}, which --overwrite "
                                 f"would replace; write the new run to another --output-dir")

    # -- 2. stage -------------------------------------------------------------------------------

    def stage(self) -> Path:
        if self.resume:
            return self.work
        _remove_stale(self.target)
        _mkdir(self.work, self.command)
        write_marker(self.work, {"command": self.command, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "config": self.config, "files": []})
        return self.work

    # -- 3. publish -----------------------------------------------------------------------------

    def publish(self) -> None:
        """Move the staged run into place (the first call; later ones only refresh the manifest)."""
        if self.published:
            self._write_manifest(self.target)
            return
        t, w = self.target, self.work
        self._write_manifest(w)
        if not t.exists():
            os.rename(w, t)
        else:
            owned = manifest(t)
            for entry in t.iterdir():  # keep what the old run did not write
                if entry.name in owned or _TEMP.search(entry.name):
                    continue
                if (w / entry.name).exists():
                    raise FileExistsError(f"{self.command}: {entry} was not written by pyllm, and this run wrote a "
                                          f"file of that name; the old run is kept (move {entry.name} away)")
                _link_copy(entry, w / entry.name)
            _exchange(w, t)  # now t is the new run, w the old one
            shutil.rmtree(w)
        os.symlink(t.resolve(), w, target_is_directory=True)  # the run keeps writing to w: it lands in t
        self.published = True

    def _write_manifest(self, folder: Path) -> None:
        """The marker's ``files``: what this run wrote. In the stage that is everything; in the
        published folder, what was listed plus the run's standard names that have appeared since."""
        marker = _read_marker(folder)
        names = {p.name for p in Path(folder).iterdir() if not _TEMP.search(p.name)}
        owned = names if folder == self.work and not self.published else (
            set(marker.get("files") or []) | (names & RUN_FILES))
        marker["files"] = sorted(owned | {RUN_MARKER})
        write_marker(folder, marker)

    # -- 4. close -------------------------------------------------------------------------------

    def close(self, keep: bool) -> None:
        """``keep``: the job ended (or was interrupted) normally: list what the run wrote since it
        was published. A run never published (it failed, or stopped before its first step) is
        dropped with its stage."""
        if keep and self.published:
            self._write_manifest(self.target)
        if self.resume:
            return
        if self.work.is_symlink():
            self.work.unlink()
        elif self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)


# -- the interface used by pyllm.train.api ---------------------------------------------------------

_OPEN: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("pyllm_run_folders", default=None)


@contextlib.contextmanager
def transaction():
    """Around one job: the run folder it opens is published at the end (or after Ctrl-C, when a
    checkpoint was written) and discarded on any failure."""
    opened: list = []
    token = _OPEN.set(opened)
    try:
        yield opened
    except KeyboardInterrupt:
        for run in opened:
            run.close(keep=True)
        raise
    except BaseException as e:
        for run in opened:
            if run.published and e.args and isinstance(e.args[0], str):  # name the folder the user knows
                e.args = (e.args[0].replace(str(run.work), str(run.target)), *e.args[1:])
            run.close(keep=False)
        raise
    else:
        for run in opened:
            run.close(keep=True)
    finally:
        _OPEN.reset(token)


def open_run(output_dir, command: str, *, overwrite: bool, resume: bool, config: dict) -> RunFolder:
    """Check, then stage; returns the run (``run.work`` is where it writes)."""
    run = RunFolder(Path(output_dir), command, overwrite=overwrite, resume=resume, config=config)
    run.check()
    opened = _OPEN.get()
    if opened is not None:
        opened.append(run)
    run.stage()
    return run


def publish() -> None:
    """The trainer's checkpoint hook: publish the run of the current job (if any)."""
    for run in _OPEN.get() or ():
        run.publish()


# -- helpers -----------------------------------------------------------------------------------------


def _read_marker(folder) -> dict:
    path = Path(folder) / RUN_MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(folder, data: dict) -> None:
    from .report import atomic_write_text

    atomic_write_text(Path(folder) / RUN_MARKER, json.dumps(data, indent=2, default=str) + "\n")


def manifest(folder) -> set:
    """Top-level names in ``folder`` that pyllm wrote (its manifest, or the standard names)."""
    files = _read_marker(folder).get("files")
    return set(files) if isinstance(files, list) and files else set(RUN_FILES)


def load_checkpoint_header(folder) -> None:
    """Raise now, before anything runs, if the checkpoint of ``folder`` does not read."""
    load_checkpoint(folder, tensors=False)


def _mkdir(path: Path, cmd: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise PermissionError(f"{cmd}: cannot create {path}: Permission denied ({e.filename})") from None


def _link_copy(src: Path, dst: Path) -> None:
    """dst becomes the same file(s) as src: hard links (no data copied), else a copy."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically where the OS can; else b -> backup, a -> b, drop backup
    (a crash in between is repaired by :func:`_recover`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        at_fdcwd = -100
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
    backup = b.parent / f".{b.name}.pyllm-old-{os.getpid()}"
    os.rename(b, backup)
    os.rename(a, b)
    os.rename(backup, a)


def _recover(target: Path) -> None:
    """A crash between the two renames of the fallback exchange left the old run at a backup name."""
    if target.exists():
        return
    for backup in target.parent.glob(f".{target.name}.pyllm-old-*"):
        os.rename(backup, target)
        return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: Path) -> None:
    """Delete the stages of runs into ``target`` whose process is gone."""
    for p in target.parent.glob(f".{target.name}.pyllm-run-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            if p.is_symlink() or p.is_file():
                p.unlink()
            else:
                shutil.rmtree(p, ignore_errors=True)


def write_files(folder, write) -> None:
    """``write(tmp)`` fills a temporary folder inside ``folder``; each of its files then replaces
    its namesake in ``folder`` atomically (a kill leaves every file old or new, never half)."""
    import tempfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".pyllm-save-"))
    try:
        write(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
