"""Builds the C++ sources in ``csrc/`` and loads them as ``torch.ops.nasfast.*`` (the native backend's
ops live in ``nasfast.kernels.native``).

The sources are JIT-built once per machine with ``torch.utils.cpp_extension.load`` (ninja) into a cache
directory, on first use (``available()`` or the first op call), not at import; the first build says
when it starts and ends. Where there is no compiler or the build fails, ``available()`` is False and
``why_unavailable()`` says why; ``nasfast.kernels.registry`` then falls back to eager.

Environment:
- ``NASFAST_CSRC``: the C++ sources (default ``nasfast/csrc``: the checkout's ``csrc/`` or the wheel's copy).
- ``NASFAST_BUILD_DIR``: build cache (default ``$TORCH_EXTENSIONS_DIR/nasfast`` if set, else
  ``~/.cache/nasfast``), one sub-directory per torch version / CPU capability / source content.
- ``NASFAST_NATIVE_ARCH=avx2|default``: build for at most that ISA (default: the widest torch uses here,
  AVX512, AVX2+FMA or portable).
- ``NASFAST_NATIVE_VERBOSE=1``: show the compiler output.
- ``NASFAST_NATIVE_GEMM=aten``: attention GEMMs through ATen instead of the BLAS in libtorch_cpu (read by csrc/gemm.cpp).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

_LOCK = threading.Lock()
_STATE: dict = {"loaded": False, "error": None, "path": None}


def _sources_dir() -> Path:
    """NASFAST_CSRC, else ``nasfast/csrc``: the top-level csrc/ in a checkout (through the link
    nasfast/csrc -> ../csrc), the copy shipped as package data in an installed wheel."""
    if os.environ.get("NASFAST_CSRC"):
        return Path(os.environ["NASFAST_CSRC"])
    return Path(__file__).resolve().parent.parent / "csrc"  # kernels/native_build.py -> csrc/ beside kernels/


_ARCH_FLAGS = {
    # the flags torch builds its own AVX512 / AVX2 kernels with, so at::vec picks the same code paths
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _arch() -> str:
    """The widest vector ISA torch itself uses on this CPU ('avx512', 'avx2'), else 'default'.

    ``NASFAST_NATIVE_ARCH`` (avx512 | avx2 | default) caps it: a build never uses more than the CPU has.
    """
    order = ["default", "avx2", "avx512"]
    found = "default"
    if platform.machine().lower() in ("x86_64", "amd64"):
        found = {"AVX2": "avx2", "AVX512": "avx512"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    cap = os.environ.get("NASFAST_NATIVE_ARCH", "").lower()
    if cap:
        if cap not in order:
            raise ValueError(f"NASFAST_NATIVE_ARCH must be one of {order}, got {cap!r}")
        found = order[min(order.index(found), order.index(cap))]
    return found


def _build_dir(arch: str, src: Path) -> Path:
    """One folder per (torch version, CPU capability, source content): two checkouts with different C++
    sources never rebuild over each other's extension, and the same sources always reuse one build."""
    root = os.environ.get("NASFAST_BUILD_DIR")
    if root is None:
        ext = os.environ.get("TORCH_EXTENSIONS_DIR")
        root = str(Path(ext) / "nasfast") if ext else str(Path.home() / ".cache" / "nasfast")
    digest = hashlib.sha1()
    for path in sorted([*src.glob("*.cpp"), *src.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"torch{torch.__version__.replace('+', '_')}-{arch}-{digest.hexdigest()[:10]}"
    return Path(root) / tag


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise builds with an OS file lock, which the kernel releases if its holder dies.

    torch's own build lock is a plain ``lock`` file: a build killed hard (SIGKILL, OOM, a closed
    terminal) leaves it behind, and every later process waits on it forever. Holding our lock proves
    no other nasfast build is running here, so such a file is stale and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: keep torch's behaviour
        yield
        return
    with open(build_dir / "nasfast.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stage_sources(src: Path, staged: Path) -> list[str]:
    """Copy the sources into the build folder and compile from there: the compiler commands then do
    not depend on where nasfast is installed, so a checkout and an installed wheel with the same
    sources share one build instead of rebuilding over each other. Unchanged files keep their mtime
    (ninja rebuilds on a newer source)."""
    staged.mkdir(exist_ok=True)
    for path in [*src.glob("*.cpp"), *src.glob("*.h")]:
        target = staged / path.name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            shutil.copy2(path, target)
    return sorted(str(p) for p in staged.glob("*.cpp"))


def _build() -> str:
    from torch.utils import cpp_extension

    src = _sources_dir()
    sources = sorted(str(p) for p in src.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"C++ sources not found in {src} (set NASFAST_CSRC to the csrc/ folder)")
    arch = _arch()
    cflags = ["-O3", "-fopenmp", "-Wno-c++20-extensions", "-Wno-unused-function", *_ARCH_FLAGS[arch]]
    build_dir = _build_dir(arch, src)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"nasfast_native_{arch}"
    with _build_lock(build_dir):
        sources = _stage_sources(src, build_dir / "src")
        # The first build on a machine takes minutes of silence otherwise: say when it starts and ends
        # (checked under the lock, so a process that waited for another's build says nothing).
        compiling = not (build_dir / f"{name}.so").exists()
        if compiling:
            print(f"nasfast: compiling the native C++ ops once for this machine ({arch}) into {build_dir}; "
                  f"this takes a few minutes", file=sys.stderr, flush=True)
            started = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],  # libgomp.so.1: the same soname torch's own runtime is loaded as
            extra_include_paths=[str(build_dir / "src")],
            build_directory=str(build_dir),
            is_python_module=False,  # plain TORCH_LIBRARY .so, loaded with torch.ops.load_library
            verbose=os.environ.get("NASFAST_NATIVE_VERBOSE") == "1",
        )
        if compiling:
            print(f"nasfast: native C++ ops built in {time.perf_counter() - started:.0f} s (cached for later runs)",
                  file=sys.stderr, flush=True)
    return str(build_dir)


def ensure() -> bool:
    """Build (once per machine) and load the C++ ops; False (with the reason kept) when that fails."""
    if _STATE["loaded"] or _STATE["error"] is not None:
        return _STATE["loaded"]
    with _LOCK:
        if not _STATE["loaded"] and _STATE["error"] is None:
            try:
                if hasattr(torch.ops, "nasfast") and hasattr(torch.ops.nasfast, "bias_gelu_fwd"):
                    _STATE["path"] = "already registered"
                else:
                    _STATE["path"] = _build()
                _register_fakes()
                _STATE["loaded"] = True
            except Exception as exc:  # no compiler, missing headers, failed link ...
                _STATE["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
    return _STATE["loaded"]


def _register_fakes() -> None:
    """Shape/dtype-only ("fake") versions of the C++ ops, for torch.compile / FakeTensor tracing.

    Every C++ op returns fresh contiguous tensors whatever its inputs' strides, so the fakes do too.
    (``dropout_keep_mask`` and ``gemm_backend`` are test/debug helpers defined with their function,
    i.e. CompositeImplicitAutograd, which torch does not let have a fake.)
    """
    lib = torch.library

    def once(name, fn):
        try:
            lib.register_fake(f"nasfast::{name}", fn)
        except RuntimeError as exc:  # another import path registered them in this process already
            if "already" not in str(exc):
                raise

    def new(t, shape=None, dtype=None):
        return t.new_empty(t.shape if shape is None else shape, dtype=dtype or t.dtype)

    def rows(x):
        return x.numel() // x.shape[-1] if x.shape[-1] else 0

    once("bias_gelu_fwd", lambda x, bias: new(x))
    once("dropout_apply", lambda x, p, keep_mask, seed: new(x))
    once("bias_gelu_bwd", lambda grad, x, bias: (new(x), new(bias, (x.shape[-1],))))
    once("add_dropout_layernorm_fwd",
         lambda x, residual, weight, bias, p, keep_mask, seed, eps: (new(x), new(x, (rows(x),)), new(x, (rows(x),))))
    once("add_dropout_layernorm_bwd",
         lambda grad, x, residual, weight, mean, rstd, p, keep_mask, seed: (new(x), new(x), new(weight), new(weight)))
    once("add_dropout_layernorm_fwd_half", lambda x, residual, weight, bias, p, keep_mask, seed, eps: new(residual))
    once("bias_gelu_fwd_half", lambda x, bias: new(x))
    once("dwconv_bias_gelu_fwd", lambda x, weight, bias, token_mask: new(x))
    once("dwconv_bias_gelu_bwd", lambda grad, x, weight, bias, token_mask: (new(x), new(weight), new(bias)))
    once("attention_fwd", lambda q, k, v, token_mask: (new(q), new(q, q.shape[:3])))
    once("attention_bwd", lambda grad, q, k, v, out, lse, token_mask: (new(q), new(k), new(v)))
    once("attention_qkv_fwd", lambda qkv, heads, token_mask: (
        new(qkv, (*qkv.shape[:2], qkv.shape[2] // 3)), new(qkv, (qkv.shape[0], heads, qkv.shape[1]))))
    once("attention_qkv_bwd", lambda grad, qkv, heads, token_mask: new(qkv))
    once("cross_entropy_fwd", lambda logits, targets: (new(logits, ()), new(logits, (logits.shape[0],))))
    once("cross_entropy_bwd", lambda grad, logits, targets, lse: new(logits))
    once("alignment_loss_fwd", lambda child, anchor, token_mask, need_grad: (
        new(child[0], ()), [new(c) for c in child] if need_grad else []))


def available() -> bool:
    """True when the C++ ops are built and loaded (builds them on the first call)."""
    return ensure()


def why_unavailable() -> str:
    return "" if ensure() else str(_STATE["error"])
