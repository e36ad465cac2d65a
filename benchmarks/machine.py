"""The machine description written beside every benchmark result (one definition for all scripts)."""
from __future__ import annotations

import os
import platform
import re
import sys

from nasfast.allocator import tune_malloc

# Every benchmark imports this module: tune glibc malloc as the nasfast CLI does (large tensors kept in
# the heap, not page-faulted in afresh per allocation), so eager, transformers and nasfast rows alike run
# the way a user's `nasfast ...` job runs. NASFAST_MALLOC_TUNE=0 measures without.
MALLOC_TUNED = tune_malloc()


def _cpuinfo() -> tuple[str, list[str]]:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown", []
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    isa = sorted(f for f in (flags.group(1).split() if flags else []) if f in ("avx2", "fma", "avx512f"))
    return (model.group(1).strip() if model else "unknown"), isa


def describe() -> dict:
    """CPU, threads, GPU and library versions; works without CUDA (gpu is None then)."""
    import torch

    cpu, isa = _cpuinfo()
    info = {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "isa": isa,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "malloc_tuned": MALLOC_TUNED,  # nasfast.allocator.tune_malloc
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],  # a shared machine is noisy
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count)
    for name in ("triton", "deepspeed", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    return info


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
