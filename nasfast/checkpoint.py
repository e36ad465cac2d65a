"""Atomic checkpoints: write a temp file in the same folder, fsync, then rename over the target.

A reader therefore sees either the previous complete checkpoint or the new complete one, even if
the writer is killed with SIGKILL at any moment.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from .faults import kill_point


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, rename over it, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        kill_point(f"before-rename:{path.name}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically: readers see the previous checkpoint or the new one, never a torn file."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (JSON results) so readers see the old or the new content, never a torn one."""
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def load(path: Path) -> dict:
    """The raw checkpoint dict, unchecked (``nasfast.checkpointer.read_checkpoint`` validates it)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
