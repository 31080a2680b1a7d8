"""Resumable checkpoints: one safetensors file, written atomically, loaded without pickle.

``checkpoint.safetensors`` in the run folder holds everything a resumed run needs to
continue the same loss curve: model, optimizer, scheduler and scaler states, every
process's RNG states, and the data position (epoch and batch). Tensors are stored as
safetensors; everything else (numbers, strings, lists, tuples, dicts with int or str keys)
as JSON in the file's metadata, where each tensor appears as a reference to its entry.
Loading it parses data and never runs code, so a crafted file in a run folder can do no
harm: anything that is not such a file is refused with an error naming it.

The file is written to a temporary name in the same folder and renamed over the old
one (``os.replace`` is atomic), so an interrupted save never loses the last good
checkpoint. Runs of older pyllm versions left ``checkpoint.pt`` (a pickle); it is never
loaded.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
_META_KEY = "pyllm_state"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a pyllm checkpoint; the message names it."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# -- plain data <-> JSON + tensors -------------------------------------------------------------


def _flatten(obj, tensors: dict):
    """JSON-able skeleton of ``obj``; its tensors move to ``tensors`` under numbered names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_flatten(x, tensors) for x in obj]
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"save_checkpoint: cannot store a {type(obj).__name__} ({obj!r:.60}); "
                    "checkpoints hold tensors and plain data only")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, list):
        return [_unflatten(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(x, tensors) for x in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
        raise ValueError(f"unknown entry {sorted(obj)}")
    return obj


# -- files --------------------------------------------------------------------------------------


def save_checkpoint(state: dict, folder) -> Path:
    """Atomically write ``state`` (tensors and plain data) to ``folder/checkpoint.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    path = folder / CHECKPOINT
    tensors: dict = {}
    meta = {_META_KEY: json.dumps(_flatten(state, tensors)), "format": "pt"}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=CHECKPOINT + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def has_checkpoint(folder) -> bool:
    return (Path(folder) / CHECKPOINT).is_file()


def load_checkpoint(folder, *, tensors: bool = True) -> dict:
    """The state saved by :func:`save_checkpoint`. Raises :class:`CheckpointError` naming the
    file when it is not one (empty, truncated, garbage, a pickle) and FileNotFoundError when
    there is none. ``tensors=False`` reads the header only (a cheap check before a run starts)
    and returns the plain-data skeleton, tensors left as references."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    path = folder / CHECKPOINT
    if not path.is_file():
        if (folder / LEGACY_CHECKPOINT).is_file():
            raise CheckpointError(
                f"resume: {folder / LEGACY_CHECKPOINT} is a pickle checkpoint of an older pyllm; it is not "
                "loaded, because unpickling a file can run code. Start the run again (pyllm now writes "
                f"{CHECKPOINT}, which holds data only)")
        raise FileNotFoundError(f"resume: no {CHECKPOINT} in {folder}; nothing to resume")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            skeleton = json.loads(meta[_META_KEY])
            if not tensors:
                return skeleton
            return _unflatten(skeleton, {k: f.get_tensor(k) for k in f.keys()})
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CheckpointError(f"resume: {path} is not a pyllm checkpoint (a safetensors file with the run "
                              f"state); it may be truncated, damaged or from another program ({why})") from None
