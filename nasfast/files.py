"""Files: user-supplied paths checked up front with one-line errors (text to read, outputs to write),
and atomic writes (temp file beside the target, fsync, rename; a reader sees the previous complete
file or the new one, even if the writer is killed with SIGKILL at any moment)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from nasfast.errors import UserError
from nasfast.faults import kill_point


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; UserError (naming ``what``) if it is missing, a folder or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (undecodable byte at offset {exc.start})") from None


def _existing_ancestor(path: Path) -> Path:
    """The deepest part of ``path`` that exists (``path`` itself if it does)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` can be used (or created) as an output folder: not a file, not under a file, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; it must be a folder")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} is not writable ({base}: permission denied)")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` can be written as a file: not a folder, its folder creatable and writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; it must be a file path")
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {base} is a file")
    target = path if path.exists() else base
    if not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path} is not writable (permission denied)")
    return path


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
