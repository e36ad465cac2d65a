"""Helpers for the run-folder safety tests: real CLI processes, one-line error checks, a trained micro run."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m nasfast ARGS`` in a real process."""
    return subprocess.run([sys.executable, "-m", "nasfast", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, **kw)


def popen(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nasfast", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})}, **kw)


def assert_one_line(stderr: str, needle: str) -> str:
    """stderr is exactly one line, holds ``needle``, and no traceback."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def strict_json_lines(path: Path) -> list[dict]:
    """Parse every line of a JSONL file as strict JSON (NaN / Infinity are errors)."""
    def reject(token):
        raise ValueError(f"non-strict JSON constant {token} in {path}")

    return [json.loads(l, parse_constant=reject) for l in Path(path).read_text().splitlines()]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def unprivileged():
    """preexec_fn that makes file permissions bind a root process too (drops CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set before exec); None when not root."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without CAP_SETPCAP: cannot make permissions bind")
    return drop
