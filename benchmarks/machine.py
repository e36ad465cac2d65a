"""The machine description written beside every benchmark result."""
from __future__ import annotations

import os
import platform
import sys


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("triton", "deepspeed", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    return info


def command_line() -> str:
    return " ".join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "python"] + sys.argv[1:])
