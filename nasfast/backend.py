"""Choose the implementation of the fused ops once, from the config's ``backend`` key.

Every backend exposes the same five functions with the signatures of ``nasfast.kernels.reference``:
``bias_gelu, add_dropout_layernorm, dwconv_bias_gelu, attention, alignment_loss``.
- ``eager``: the PyTorch references (always available; the definition of correct).
- ``triton``: ``nasfast.kernels.triton_ops`` (CUDA, or CPU under TRITON_INTERPRET=1 for tests).
- ``native``: ``nasfast.native`` C++ ops registered under ``torch.ops.nasfast`` (CPU).
- ``auto``: triton on CUDA, native on CPU when it builds, eager otherwise.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("auto", "eager", "triton", "native")
OP_NAMES = ("bias_gelu", "add_dropout_layernorm", "dwconv_bias_gelu", "attention", "alignment_loss")
_MODULES = {
    "eager": "nasfast.kernels.reference",
    "triton": "nasfast.kernels.triton_ops",
    "native": "nasfast.native",
}


@dataclass(frozen=True)
class OpSet:
    name: str
    bias_gelu: Callable
    add_dropout_layernorm: Callable
    dwconv_bias_gelu: Callable
    attention: Callable
    alignment_loss: Callable


def _load(name: str) -> OpSet:
    module = importlib.import_module(_MODULES[name])
    if hasattr(module, "available") and not module.available():
        raise RuntimeError(f"backend '{name}' is not available: {getattr(module, 'why_unavailable', lambda: '')()}")
    return OpSet(name, *(getattr(module, op) for op in OP_NAMES))


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map ``auto`` to a concrete backend for ``device``; validate explicit names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})")
    if name != "auto":
        return name
    device = torch.device(device)
    preferred = "triton" if device.type == "cuda" else "native" if device.type == "cpu" else "eager"
    if preferred == "eager":
        return "eager"
    try:
        _load(preferred)
        return preferred
    except Exception as exc:  # a missing compiler or driver must not stop training
        warnings.warn(f"backend '{preferred}' unavailable ({exc}); falling back to eager", stacklevel=2)
        return "eager"


def get_ops(name: str, device: torch.device | str = "cpu") -> OpSet:
    return _load(resolve_backend(name, device))
