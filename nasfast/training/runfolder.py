"""A run folder (``--out``): one writer at a time, fresh start vs resume, config.yaml and summary.json.

A run folder holds config.yaml, data/ (tokenizer + blocks), checkpoints/last.pt, metrics.jsonl,
curves.png, summary.json and .lock. The rules that keep it from being lost or mixed up:
- one writer: ``pretrain`` holds an OS lock (flock) on .lock while it runs; a second writer fails
  with the holder's pid. The kernel drops the lock when the holder dies, even by SIGKILL;
- nothing is written before the inputs are checked: config.yaml is (re)written only after the
  checkpoint of a resume has been read and fits the model;
- a resume continues the same run: only the keys in ``RESUMABLE`` may change (see there);
- a fresh start in a folder without a checkpoint discards what a killed start left behind
  (data/, metrics.jsonl, summary.json, curves.png), so it never trains on a stale tokenizer.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

import yaml

from nasfast.config import Config, migrate
from nasfast.errors import UserError
from nasfast.files import atomic_write_text, check_output_dir
from nasfast.space.checks import load_run_config
from nasfast.training.checkpointer import CHECKPOINT
from nasfast.training.metrics import dumps

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"

# Keys a resume may change, and why they are safe:
# - train.steps: a longer (or shorter) run; the LR schedule follows the new total from the resumed
#   step on, so the result equals an uninterrupted run only when steps is unchanged;
# - train.lr, train.clip_norm: recovery after a divergence (resume from the last good checkpoint with
#   a lower peak LR or clipping); applied from the resumed step on;
# - logging, evaluation and checkpoint cadence, which children are evaluated: no effect on training;
# - train.device, kernels.backend, data.cache_dir: where and with which kernels the same math runs.
# Everything else (model, space, data, sampler, seed, batch, schedule shape) defines the run.
RESUMABLE = (
    "train.steps", "train.lr", "train.clip_norm", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.eval_random_children", "train.device", "kernels.backend", "data.cache_dir",
    "data.prepared", "data.num_proc", "data.prefetch", "data.copy_max_mb",  # data.prepared: its content hash must match
)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_resume_changes(saved: dict, cfg: Config, source: str = "the checkpoint") -> None:
    """UserError naming the first key outside ``RESUMABLE`` whose value differs from the saved config."""
    before, now = _flatten(migrate(saved)), _flatten(cfg.to_dict())
    for key, old in before.items():
        if key in now and now[key] != old and key not in RESUMABLE:
            raise UserError(f"--resume cannot change {key} ({old!r} in {source}, {now[key]!r} asked): it would no longer "
                            f"continue the same run; start a new run with another --out (may change on resume: "
                            f"{', '.join(RESUMABLE)})")


def resume_config(out: Path, config_file: Optional[str], overrides: list[str]) -> Config:
    """The config of ``pretrain --resume``: the run's config.yaml (or ``config_file``, e.g. a job script
    that always passes --config) with ``overrides``, checked against the saved one."""
    out = Path(out)
    saved_path = out / "config.yaml"
    if not out.is_dir():
        raise UserError(f"--resume: {out} is not a run folder (no {saved_path.name})")
    if not (out / CHECKPOINT).is_file():
        check_not_in_use(out)  # a running first start has no checkpoint yet: say who holds the folder, not "stopped"
        raise UserError(f"--resume: no checkpoint at {out / CHECKPOINT}: the run stopped before its first checkpoint; "
                        "start it again without --resume")
    if not saved_path.is_file():
        raise UserError(f"--resume: {saved_path} not found")
    try:
        saved = load_run_config(saved_path)
    except UserError as exc:  # a hand-edited or damaged saved config: say which file the value is in
        raise UserError(f"{saved_path}: {exc}" if str(saved_path) not in str(exc) else str(exc)) from None
    cfg = load_run_config(config_file if config_file else saved_path, overrides)
    check_resume_changes(saved.to_dict(), cfg, str(saved_path))
    return cfg


def lock_holder(folder: Path) -> Optional[str]:
    """Who holds ``folder``'s lock ("pid N on HOST, started ..."), or None when nobody does; takes nothing."""
    path = Path(folder) / LOCK
    if fcntl is None or not path.is_file():
        return None
    try:
        with open(path) as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when the file closes
            except OSError:
                return fh.read().strip() or "holder unknown"
    except OSError:
        return None
    return None


def in_use_message(folder: Path, holder: str) -> str:
    return f"{folder} is in use by another nasfast process ({holder}); wait for it to end or choose another --out"


def check_not_in_use(folder: Path) -> None:
    """The one message for a folder another process is writing (the same as a fresh start's)."""
    holder = lock_holder(folder)
    if holder is not None:
        raise UserError(in_use_message(folder, holder))


class RunFolder:
    def __init__(self, path: str | Path, writer: bool = True):
        self.path, self.writer = Path(path), writer
        self._lock_fh = None

    checkpoint = property(lambda self: self.path / CHECKPOINT)
    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    curves_path = property(lambda self: self.path / "curves.png")

    def open(self, resume: bool) -> None:
        """Check the path, take the lock (writer), and check that a checkpoint exists iff ``resume``."""
        if resume and not self.checkpoint.is_file():  # before creating anything
            check_not_in_use(self.path)
            raise UserError(f"--resume: no checkpoint at {self.checkpoint}")
        if self.writer:
            check_output_dir(self.path, "--out")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create --out {self.path}: {exc.strerror or exc}") from None
            self._lock()  # first: "in use by pid N" says more than what a running writer has written so far
        has_checkpoint = self.checkpoint.is_file()
        if resume and not has_checkpoint:
            raise UserError(f"--resume: no checkpoint at {self.checkpoint}")
        if not resume and has_checkpoint:
            raise UserError(f"{self.path} already holds a run; pass --resume to continue it or choose another --out")

    def _lock(self) -> None:
        if fcntl is None:
            return
        path = self.path / LOCK
        try:
            fh = open(path, "a+")
        except OSError as exc:
            raise UserError(f"cannot write to --out {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "holder unknown"
            fh.close()
            raise UserError(in_use_message(self.path, holder)) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        fh.flush()
        self._lock_fh = fh

    def release(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing the file drops the flock
            self._lock_fh = None

    def discard_leftovers(self) -> None:
        """A fresh start: remove what a start killed before its first checkpoint left behind."""
        for path in (self.metrics_path, self.summary_path, self.curves_path):
            path.unlink(missing_ok=True)

    def save_config(self, cfg: Config) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_summary(self) -> Optional[dict]:
        """summary.json if it is there and complete, else None."""
        try:
            summary = json.loads(self.summary_path.read_bytes())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) and {"status", "step", "steps"} <= summary.keys() else None

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, dumps(summary, indent=2))
