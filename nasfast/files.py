"""Files: user-supplied paths checked up front with one-line errors (text to read, outputs to write),
atomic writes (temp file beside the target, fsync, rename; a reader sees the previous complete
file or the new one, even if the writer is killed with SIGKILL at any moment), and the one place a
full, over-quota or read-only file system becomes a one-line ``StorageError`` (``writing``)."""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

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
    _refuse_read_only(base, path)
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
    _refuse_read_only(target, path)
    if not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path} is not writable (permission denied)")
    return path


# --- a full, over-quota or read-only file system: the environment, not a bug -------------------------
# What each errno says, and what the user does about it (the message's "..., then <rerun>").
_STORAGE = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space (or raise the quota)"),
    errno.EROFS: ("read-only file system", "remount it read-write"),
}
RERUN = "run the command again"
# Below this many free bytes (measured while the failed write's partial file still exists) a write
# whose errno a library hid (torch.save to a path: "unexpected pos") is taken for a full disk.
_NEARLY_FULL = 1 << 20


def _size(n: int) -> str:
    """Bytes for people: 1.2 MB (decimal units, like df -H)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (or its deepest existing ancestor)."""
    path = _existing_ancestor(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int:
    """Bytes this process may still write on ``path``'s file system (root may use the reserved blocks)."""
    st = os.statvfs(_existing_ancestor(path))
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


class StorageError(UserError):
    """Writing ``path`` failed because its file system is full, over quota or read-only.

    The message names the path, the free space (or the read-only mount) and what to do; ``rerun``
    is the command-specific second half (``pretrain`` says where ``--resume`` continues from).
    """

    def __init__(self, path: Optional[Path], code: int, rerun: str = RERUN):
        self.path, self.code, self.rerun = path, code, rerun
        super().__init__(self._message())

    def then(self, rerun: str) -> "StorageError":
        """The same fault with another rerun advice."""
        return StorageError(self.path, self.code, rerun)

    def _message(self) -> str:
        what, fix = _STORAGE[self.code]
        if self.path is None:  # a writer that does not name its file (the CLI's last resort)
            return f"{what} while writing output; {fix}, then {self.rerun}"
        try:
            mount = _mount_point(Path(self.path))
            where = (f"{mount} is mounted read-only" if self.code == errno.EROFS
                     else f"{_size(_free_bytes(Path(self.path)))} free on {mount}")
        except OSError:  # the folder vanished meanwhile: still the one line, without the numbers
            where = "file system unavailable"
        return f"{what} writing {self.path} ({where}); {fix}, then {self.rerun}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (each once)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_errno(exc: BaseException, path: Optional[Path] = None) -> Optional[int]:
    """ENOSPC, EDQUOT or EROFS if that is why ``exc`` (a write of ``path``) failed, else None.

    Libraries hide the errno in three ways, checked in turn: an OSError in the exception chain
    (torch.save to a file object: RuntimeError raised while handling it); the errno's text inside
    another exception's message (safetensors: "I/O error: No space left on device (os error 28)");
    nothing at all (torch.save to a path: a RuntimeError), where the target file system itself is
    asked: read-only, or almost no space left while the failed write's partial file still holds it.
    """
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno in _STORAGE:
            return e.errno
    for e in chain:
        text = str(e)
        for code in _STORAGE:
            if os.strerror(code) in text:
                return code
    if path is None or not isinstance(exc, (OSError, RuntimeError)):  # only failures of the write itself
        return None
    try:
        st = os.statvfs(_existing_ancestor(Path(path)))
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    return errno.ENOSPC if _free_bytes(Path(path)) < _NEARLY_FULL else None


def _remove(partial: Path) -> None:
    """Remove a failed write's temp file or folder (never the target itself)."""
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        try:
            partial.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def writing(path: Optional[Path], partial: Optional[Path] = None) -> Iterator[None]:
    """Writes inside become ``StorageError(path)`` when the file system is full, over quota or read-only.

    Every writer goes through here: the atomic writers below, the non-atomic ones (savefig,
    save_pretrained, prepared data) around their writes, and the CLI around each command (``path``
    None: only errors that carry their errno or its text). ``partial``, the write's temp file or
    folder, is removed on any failure, after the full-disk check (it is part of the evidence).
    Other errors pass unchanged.
    """
    try:
        yield
    except BaseException as exc:
        # a UserError already says what went wrong and where (its text may quote an errno's)
        code = None if isinstance(exc, (UserError, KeyboardInterrupt, SystemExit)) else storage_errno(exc, path)
        if partial is not None:
            _remove(Path(partial))
        if code is None:
            raise
        target = path if path is not None else getattr(exc, "filename", None)
        raise StorageError(Path(target) if target else None, code) from exc


def _refuse_read_only(existing: Path, path: Path) -> None:
    """Up front, before any heavy work: a read-only mount is named as such (os.access says only "no")."""
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        return
    if read_only:
        raise StorageError(path, errno.EROFS)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, rename over it, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, partial=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        kill_point(f"before-rename:{path.name}")
        os.replace(tmp, path)
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


def atomic_savefig(fig: Any, path: Path, **kwargs: Any) -> None:
    """``fig.savefig``, atomically (the previous plot stays until the new one is complete); the format
    comes from ``path``'s suffix, since the temp file has none of its own."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    _atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **kwargs))


def file_sha1(path: str | Path) -> str:
    """The sha1 of a file's content, read in 1 MiB chunks (checkpoint identities in caches and exports)."""
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
