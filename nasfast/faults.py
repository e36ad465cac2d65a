"""Named kill points for fault-injection tests.

``NASFAST_KILL_AT=name[:n]`` makes the process SIGKILL itself the n-th time (default: the first) it
passes ``kill_point(name)``. The tests use it to land a SIGKILL inside windows too short to hit by
timing alone (between a temp file's fsync and its rename, after the final checkpoint). Unset, a
kill point is one comparison.
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def kill_point(name: str) -> None:
    spec = os.environ.get("NASFAST_KILL_AT")
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if not count.isdigit():  # no count given (names may contain ':')
        target, count = spec, "1"
    if name != target:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
