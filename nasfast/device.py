"""Where a run computes: the torch device (whether the chosen kernels backend runs there is
``nasfast.kernels.registry.check_backend``)."""
from __future__ import annotations

import os

import torch

from nasfast.errors import UserError


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
