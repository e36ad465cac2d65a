"""Where a run computes: the torch device and whether the chosen kernels backend runs on it."""
from __future__ import annotations

import os

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available")
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name)


def check_backend(name: str, device: torch.device) -> None:
    """Fail at start-up, with the reason, if ``kernels.backend`` cannot run on ``device``."""
    from .backend import get_ops

    if name == "auto":  # falls back to eager (with a warning) by itself
        return
    try:
        get_ops(name, device)
    except (RuntimeError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"kernels.backend={name} cannot run here: {reason}") from None
