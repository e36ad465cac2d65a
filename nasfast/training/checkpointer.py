"""The run's checkpoint: given every stateful part of training once, used for both save and load.

What it guarantees, for any engine that hands it its state:
- atomic: temp file, fsync, rename; a reader sees the previous complete checkpoint or the new one,
  whenever the writer is killed;
- never writes non-finite state: a NaN or inf in any tensor raises ``NonFiniteState`` and leaves the
  last good checkpoint in place (a diverged step must not replace it);
- validated on load: an empty, truncated or foreign file, non-finite values, or weights that do not
  fit the model built from the config are one-line ``UserError``s, not tracebacks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from nasfast import rng
from nasfast.errors import UserError
from nasfast.files import atomic_save, writing

CHECKPOINT = "checkpoints/last.pt"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class NonFiniteState(Exception):
    """The state to save holds NaN or inf; the message names how many tensors and the first one."""


class RngState:
    """Python, numpy, torch (and CUDA) RNG states as one stateful part."""

    def state_dict(self) -> dict:
        return rng.rng_state()

    def load_state_dict(self, state: dict) -> None:
        rng.set_rng_state(state)


def _tensors(obj: Any, prefix: str):
    """(name, tensor) for every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def nonfinite_tensors(state: dict) -> tuple[list[str], int]:
    """Names of the floating-point tensors in ``state`` holding NaN or inf, and how many were checked."""
    named = [(n, t) for n, t in _tensors(state, "") if t.is_floating_point() or t.is_complex()]
    if not named:
        return [], 0
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in named:
        per_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    if all(bool(torch.stack(flags).all()) for flags in per_device.values()):  # one host sync per device
        return [], len(named)
    return [n for n, t in named if not bool(torch.isfinite(t).all())], len(named)


def describe_nonfinite(bad: list[str], total: int) -> str:
    return f"{len(bad)} of {total} tensors hold NaN or inf (first: {bad[0]})"


def raw_checkpoint(path: Path) -> dict:
    """The raw checkpoint dict, unchecked (``read_checkpoint`` validates it)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: Path, required: tuple[str, ...] = ("step", "model")) -> dict:
    """Load and sanity-check a checkpoint file; every way it can be unusable is one ``UserError`` line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = raw_checkpoint(path)
    except Exception as exc:  # torch/pickle/zip raise many types for a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({reason[:120]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a nasfast checkpoint (a {type(state).__name__}, not a dict)")
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"{path} is not a nasfast checkpoint (no {', '.join(missing)})")
    bad, total = nonfinite_tensors({k: v for k, v in state.items() if k in ("model", "optimizer")})
    if bad:
        raise UserError(f"checkpoint {path} cannot be used: {describe_nonfinite(bad, total)}")
    return state


def load_model_state(model: torch.nn.Module, saved: dict, path: Path) -> None:
    """``model.load_state_dict`` with a one-line error naming what does not fit (changed space or model)."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    reshaped = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(saved[k].shape)} saved, {tuple(own[k].shape)} built)")
    if problems:
        raise UserError(f"checkpoint {path} does not fit the model of this config: weights {'; '.join(problems)}"
                        " (were space or model settings changed?)")
    model.load_state_dict(saved)


class Checkpointer:
    """Save and load ``states`` (name -> object with state_dict/load_state_dict; None = absent) at ``path``.

    Parts named in ``optional`` may be missing from older checkpoints (their load gets None).

    Every rank calls ``save`` (each checks its own, identical, state); only the ``writer`` writes.
    """

    def __init__(self, path: Path, states: dict[str, Optional[Stateful]], writer: bool = True, optional: tuple = ()):
        self.path, self.states, self.writer, self.optional = Path(path), states, writer, optional
        self.last_step: Optional[int] = None  # step of the newest checkpoint on disk known good

    # --- the folder ----------------------------------------------------------------------------
    def clean_stale(self) -> None:
        """Remove temp files of writers killed mid-save (SIGKILL leaves them behind)."""
        folder = self.path.parent
        if folder.is_dir():
            for stale in folder.glob(f".{self.path.name}.tmp-*"):
                stale.unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Fail before the first training step, not after hours of it, if checkpoints cannot be written."""
        folder = self.path.parent
        probe = folder / f".{self.path.name}.tmp-probe-{os.getpid()}"
        try:
            with writing(folder):  # a full or read-only disk: its own message (StorageError is no OSError)
                folder.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as exc:
            raise UserError(f"cannot write checkpoints to {folder}: {exc.strerror or exc}") from None

    # --- save ----------------------------------------------------------------------------------
    def save(self, step: int, meta: Optional[dict] = None) -> None:
        state: dict[str, Any] = {"step": step}
        for name, obj in self.states.items():
            state[name] = obj.state_dict() if obj is not None else None
        bad, total = nonfinite_tensors(state)
        if bad:
            kept = f"the last good checkpoint is step {self.last_step}" if self.last_step is not None else "no checkpoint was written before"
            raise NonFiniteState(f"non-finite state after step {step}: {describe_nonfinite(bad, total)}; {kept}")
        state.update(meta or {})
        if self.writer:
            atomic_save(state, self.path)
        self.last_step = step

    # --- load ----------------------------------------------------------------------------------
    def read(self) -> dict:
        required = ("step",) + tuple(n for n, obj in self.states.items() if obj is not None)
        return read_checkpoint(self.path, required)

    def load(self, state: dict) -> int:
        """Restore every part from ``state`` (from ``read``); returns the checkpoint's step."""
        for name, obj in self.states.items():
            if obj is None:
                continue
            if name not in state and name not in self.optional:
                raise UserError(f"{self.path} is not a nasfast checkpoint of this kind of run (no '{name}')")
            if isinstance(obj, torch.nn.Module):
                load_model_state(obj, state[name], self.path)
                continue
            try:
                obj.load_state_dict(state.get(name))
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
                raise UserError(f"checkpoint {self.path}: its '{name}' state does not fit this run "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
        self.last_step = int(state["step"])
        return self.last_step
