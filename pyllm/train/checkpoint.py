"""Resumable checkpoints, written atomically.

One file, ``checkpoint.pt`` in the run folder, holds everything a resumed run
needs to continue the same loss curve: model, optimizer, scheduler and scaler
states, every process's RNG states, and the data position (epoch and batch).
It is written to a temporary file in the same folder and renamed over the old
one (``os.replace`` is atomic), so an interrupted save never loses the last
good checkpoint.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
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

        np.random.set_state(state["numpy"])


def save_checkpoint(state: dict, folder) -> Path:
    """Atomically write ``state`` to ``folder/checkpoint.pt``."""
    folder = Path(folder)
    path = folder / CHECKPOINT
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=CHECKPOINT + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(folder) -> dict:
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"resume: no {CHECKPOINT} in {folder}; nothing to resume")
    # The file holds RNG states and Python objects besides tensors; it is our own file.
    return torch.load(path, map_location="cpu", weights_only=False)
