"""Keep large CPU tensors in malloc's heap instead of fresh mmaps (glibc only).

PyTorch's CPU allocator is plain ``malloc``. glibc serves a request above ``M_MMAP_THRESHOLD``
(dynamic, at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on free, so every
activation or gradient of that size is page-faulted in again each time it is allocated: a
[4096, 2048] fp32 FFN activation (B=32, T=128, H=512) is 33.5 MB, and that first touch is a measurable
share of an H=512 training step (benchmarks/results/vs_transformers.md has the number). Pinning the mmap
threshold at 1 GiB and the trim threshold at 2 GiB makes the heap keep and reuse such blocks, the
effect Intel's PyTorch CPU guide gets by preloading jemalloc or tcmalloc. The price: memory freed by
a run stays with the process (its RSS is the peak, not the current, use).

glibc before 2.35 or so rejects an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2); there the
fallback is ``M_MMAP_MAX = 0`` (no mmap-served blocks at all), which every glibc accepts. An
LD_PRELOADed jemalloc/tcmalloc leaves glibc's ``mallopt`` without effect; that allocator then decides.

Process-wide, so it is applied by the entry points (the CLI, the benchmarks), never by importing
nasfast. ``NASFAST_MALLOC_TUNE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
_APPLIED: dict = {}


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; True if they are in effect."""
    if "ok" in _APPLIED:
        return _APPLIED["ok"]
    ok = False
    if os.environ.get("NASFAST_MALLOC_TUNE", "1") != "0" and platform.system() == "Linux":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt  # absent from musl: AttributeError
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            trimmed = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            # 1 GiB where glibc accepts it, else no mmap-served blocks at all
            kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or bool(mallopt(_M_MMAP_MAX, 0))
            ok = trimmed and kept
        except (OSError, AttributeError, ctypes.ArgumentError):
            ok = False
    _APPLIED["ok"] = ok
    return ok
