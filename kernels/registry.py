"""The fused-op registry: every fused op and every backend, registered once; an OpSet per run.

An **op** (:class:`FusedOp`) is registered once with its name, its eager reference (the definition of
correct, and the fallback), and how to generate test/benchmark inputs for it (used by
``nasfast.kernels.cases``, the one case generator of the tests and both benchmark scripts). The
built-in ops are registered in ``nasfast.kernels.builtin_ops`` (``op_names()`` lists what is registered).

A **backend** implements any subset of the ops, with the reference's signature:

- ``eager``: the PyTorch references (always available; the definition of correct);
- ``triton``: ``nasfast.kernels.triton_ops`` (CUDA, or CPU under TRITON_INTERPRET=1 for tests);
- ``native``: ``nasfast.kernels.native``, C++ ops registered under ``torch.ops.nasfast`` (CPU);
- ``auto``: triton on CUDA, native on CPU, each when it can run here, else eager (with a warning).

:func:`get_ops` resolves a backend to an :class:`OpSet` with one callable per registered op: the
backend's own where it has one (``OpSet.fused``), the eager reference for every other op
(``OpSet.fallback``), op by op. A backend that cannot run here at all raises (explicit name) or is
replaced by eager (``auto``).

Adding a fused op: register it (``register_op``; the built-ins live in ``nasfast.kernels.builtin_ops``)
and give a backend a function of that name; every test and benchmark that iterates the registry
picks it up. Adding a backend: ``register_backend`` with a module path or a dict of functions.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from nasfast.errors import UserError

AUTO = "auto"
BUILTIN_BACKENDS = ("eager", "triton", "native")
BACKENDS = (AUTO, *BUILTIN_BACKENDS)  # the built-in names; known_backends() also lists registered ones
# auto: which backend to try first on each device type (eager is the fallback everywhere)
AUTO_PREFERENCE = {"cuda": "triton", "cpu": "native"}


# ------------------------------------------------------------------------------------------ ops
@dataclass(frozen=True)
class FusedOp:
    """One fused op: its eager reference and how the shared case generator calls it.

    ``make_inputs(spec, rnd, gen)`` returns an :class:`OpInputs` for a ``nasfast.kernels.cases.CaseSpec``
    (``rnd(*shape, scale=, shift=)`` draws floats rounded to the case dtype, ``gen`` is the case's
    torch.Generator); ``arg_names(spec)`` names its tensor arguments (before the token mask). The
    token mask, when ``masked``, is appended by the generator as the last tensor argument and passed
    to ``call`` as its last positional argument (absent when the case has no mask).
    """

    name: str
    reference: Callable
    make_inputs: Callable[..., "OpInputs"]
    arg_names: Callable[[Any], list]
    masked: bool = False                       # takes a [B, T] token mask
    scalar_output: bool = False                # returns a scalar (a loss)
    dims: Optional[Callable[[Any], str]] = None  # "B2 T7 H24"-style size string of a spec (ids, rows)
    # CaseSpec fields (beyond B, T, H, dtype, scale, seed, mask) the property tests draw, with their values
    search: Mapping[str, Sequence] = field(default_factory=dict)
    layout_base: Mapping[str, Any] = field(default_factory=dict)  # CaseSpec kwargs of the layout set's case
    regressions: Sequence[Mapping[str, Any]] = ()  # extra fixed CaseSpec kwargs (past bugs, edge sizes)
    examples: Sequence[Mapping[str, Any]] = ()     # awkward fixed shapes every backend is compared on
    # realistic-size benchmark case: bench(sizes) -> (CaseSpec kwargs, shape string); sizes has
    # B, T, H, heads, layers, ffn, k, dropout, keep_mask, vocab
    bench: Optional[Callable[[Mapping[str, Any]], tuple]] = None
    # the op's error rule where it differs from the default (nasfast.kernels.cases.Rule fields:
    # eager_factor, floor per dtype); tests may still pass a stricter rule of their own
    tolerance: Mapping[str, Any] = field(default_factory=dict)
    # extra allowed error per output beyond the error rule (a documented accuracy bound), or None
    allowance: Optional[Callable[[Any], dict]] = None
    validate: Optional[Callable[[Any], None]] = None  # raises ValueError for a CaseSpec the op cannot take


@dataclass
class OpInputs:
    """What ``FusedOp.make_inputs`` returns for one case."""

    values: list                 # per tensor argument: float64 values (rounded to the case dtype) or masks
    differentiable: list         # per tensor argument
    call: Callable               # call(ops, *tensors) -> output tensor
    out_names: list              # the output, then one name per differentiable argument's gradient
    out_shape: Optional[tuple] = None  # shape of the output (default: the first argument's)


_OPS: dict[str, FusedOp] = {}
_LOCK = threading.RLock()
_BUILTINS = {"loaded": False, "loading": False}


def _ensure_builtin_ops() -> None:
    """Register the built-in ops on first use (their module imports this one: no import cycle)."""
    if _BUILTINS["loaded"] or _BUILTINS["loading"]:
        return
    with _LOCK:
        if not (_BUILTINS["loaded"] or _BUILTINS["loading"]):
            _BUILTINS["loading"] = True
            try:
                importlib.import_module("nasfast.kernels.builtin_ops")
                _BUILTINS["loaded"] = True
            finally:
                _BUILTINS["loading"] = False


def register_op(op: FusedOp) -> FusedOp:
    """Add ``op`` to the registry (a name registered twice is an error: one place per op)."""
    _ensure_builtin_ops()  # the built-ins come first, whoever registers first
    with _LOCK:
        if op.name in _OPS:
            raise ValueError(f"fused op '{op.name}' is already registered")
        if not op.name.isidentifier() or op.name.startswith("_"):
            raise ValueError(f"fused op name must be a public identifier, got '{op.name}'")
        _OPS[op.name] = op
    return op


def unregister_op(name: str) -> None:
    """Remove a registered op (tests that register a toy op clean up with this)."""
    with _LOCK:
        _OPS.pop(name, None)


def op_names() -> tuple:
    """Every registered op, in registration order (built-ins first)."""
    _ensure_builtin_ops()
    return tuple(_OPS)


def get_op(name: str) -> FusedOp:
    _ensure_builtin_ops()
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown fused op '{name}' (registered: {', '.join(_OPS)})") from None


def __getattr__(name: str):
    # OP_NAMES stays importable (``from nasfast.kernels.registry import OP_NAMES``) and always lists every
    # registered op, toy ops registered by tests included.
    if name == "OP_NAMES":
        return op_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    """A named implementation of a subset of the ops.

    Either ``module`` (imported on first use; its functions named like ops are the implementations,
    its optional ``available()`` / ``why_unavailable()`` say whether it can run here) or ``impls``
    (a dict op name -> function, e.g. a toy backend in a test).
    """

    name: str
    module: Optional[str] = None
    impls: Optional[Mapping[str, Callable]] = None
    why_unavailable: Optional[Callable[[], str]] = None  # '' when it can run here, else the reason

    def load(self) -> dict:
        """{op name: implementation} for the registered ops this backend has; raises RuntimeError
        with the reason when the backend cannot run here."""
        names = op_names()
        if self.module is not None:
            mod = importlib.import_module(self.module)
            if hasattr(mod, "available") and not mod.available():
                reason = getattr(mod, "why_unavailable", lambda: "")()
                raise RuntimeError(f"backend '{self.name}' is not available: {reason}")
            source = {n: getattr(mod, n) for n in names if callable(getattr(mod, n, None))}
        else:
            source = dict(self.impls or {})
        if self.why_unavailable is not None:
            reason = self.why_unavailable()
            if reason:
                raise RuntimeError(f"backend '{self.name}' is not available: {reason}")
        unknown = sorted(set(source) - set(names))
        if unknown:
            raise ValueError(f"backend '{self.name}' implements unregistered op(s): {', '.join(unknown)}")
        return {n: source[n] for n in names if n in source}


_BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", impls=None),  # every op's reference: see _impls_of
    "triton": Backend("triton", module="nasfast.kernels.triton_ops"),
    "native": Backend("native", module="nasfast.kernels.native"),
}


def register_backend(backend: Backend) -> Backend:
    with _LOCK:
        if backend.name in _BACKENDS or backend.name == AUTO:
            raise ValueError(f"backend '{backend.name}' is already registered")
        _BACKENDS[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"cannot unregister the built-in backend '{name}'")
    with _LOCK:
        _BACKENDS.pop(name, None)


def known_backends() -> tuple:
    """Every name ``kernels.backend`` accepts: auto, the built-ins, then registered ones."""
    return (AUTO, *_BACKENDS)


# ---------------------------------------------------------------------------------------- OpSet
class OpSet:
    """One callable per registered op (``ops.attention(...)``, ``ops["attention"]``).

    ``name``: the backend; ``fused``: the ops that backend implements; ``fallback``: the ops that
    run the eager reference because the backend has no implementation of them.
    """

    __slots__ = ("name", "fused", "fallback", "_impls")

    def __init__(self, name: str, impls: Mapping[str, Callable], fused: Sequence[str]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_impls", dict(impls))
        object.__setattr__(self, "fused", tuple(fused))
        object.__setattr__(self, "fallback", tuple(n for n in impls if n not in fused))

    def __getattr__(self, op: str) -> Callable:
        if op.startswith("_"):
            raise AttributeError(op)
        try:
            return self._impls[op]
        except KeyError:
            raise AttributeError(f"backend '{self.name}' has no op '{op}' (registered: {', '.join(self._impls)})") from None

    def __getitem__(self, op: str) -> Callable:
        return self._impls[op]

    def __setattr__(self, key, value):
        raise AttributeError("OpSet is immutable")

    def __getstate__(self):
        return {"name": self.name, "fused": self.fused, "fallback": self.fallback, "_impls": self._impls}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def __repr__(self) -> str:
        return f"OpSet({self.describe()})"

    def describe(self) -> str:
        """One line: which ops are fused and which run the eager reference."""
        if self.name == "eager":
            return f"eager: all {len(self._impls)} ops run the eager reference"
        fused = ", ".join(self.fused) or "none"
        eager = ", ".join(self.fallback) or "none"
        return f"{self.name}: fused {len(self.fused)}/{len(self._impls)} ({fused}); eager reference: {eager}"

    def report(self) -> dict:
        """For summary.json: the backend and which ops it fused."""
        return {"backend": self.name, "fused_ops": list(self.fused), "eager_ops": list(self.fallback)}


def _impls_of(name: str) -> dict:
    if name == "eager":
        return {}
    try:
        backend = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend '{name}' (choose from {', '.join(known_backends())})") from None
    return backend.load()


def _opset(name: str) -> OpSet:
    own = _impls_of(name)
    impls = {n: own.get(n, get_op(n).reference) for n in op_names()}
    return OpSet(name, impls, [n for n in op_names() if n in own])


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map ``auto`` to a concrete backend for ``device``; validate explicit names."""
    if name not in known_backends():
        raise ValueError(f"unknown backend '{name}' (choose from {', '.join(known_backends())})")
    if name != AUTO:
        return name
    preferred = AUTO_PREFERENCE.get(torch.device(device).type, "eager")
    if preferred == "eager":
        return "eager"
    try:
        _impls_of(preferred)
        return preferred
    except Exception as exc:  # a missing compiler or driver must not stop training
        warnings.warn(f"backend '{preferred}' unavailable ({exc}); falling back to eager", stacklevel=2)
        return "eager"


def get_ops(name: str, device: torch.device | str = "cpu") -> OpSet:
    """The OpSet of backend ``name`` (``auto`` resolved for ``device``): its own implementation of each
    op it has, the eager reference of every other op."""
    return _opset(resolve_backend(name, device))


def check_backend(name: str, device: torch.device) -> None:
    """Fail at start-up, with the reason, if ``kernels.backend`` cannot run on ``device``."""
    if name == "auto":  # falls back to eager (with a warning) by itself
        return
    try:
        get_ops(name, device)
    except (RuntimeError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"kernels.backend={name} cannot run here: {reason}") from None
