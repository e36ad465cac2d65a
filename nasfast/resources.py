"""What this machine can give a command: usable CPU cores and available memory.

One typo (``--num-proc 100000``, ``train.batch_size=1000000000``) must not fork hundreds of workers or
grow a process until the kernel's OOM killer ends it (and maybe a neighbour's job with it). Every
worker pool asks ``cap_workers`` for its size, and every memory check asks ``available_memory``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from nasfast.errors import UserError, warn


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def cap_workers(requested: int, name: str, inputs: Optional[int] = None, inputs_what: str = "inputs") -> int:
    """``requested`` worker processes, at most the usable cores and (if known) the number of inputs,
    with one warning line when capped. ``name`` is how the user set it (``--num-proc``, ``data.num_proc``)."""
    if requested < 1:
        raise UserError(f"{name} must be >= 1, got {requested}")
    cores = usable_cores()
    limits = [(cores, "the machine's cores")]
    if inputs is not None:
        limits.append((max(1, inputs), f"the {inputs} {inputs_what}"))
    limit, why = min(limits, key=lambda item: item[0])
    if requested <= limit:
        return requested
    warn(f"{name} {requested} capped at {limit} ({why})")
    return limit


def _meminfo_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (what can be allocated without swapping), if readable."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: torch.device | str = "cpu") -> Optional[int]:
    """Bytes a new allocation on ``device`` can use now; None when the platform does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    found = _meminfo_available()
    if found is not None:
        return found
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
