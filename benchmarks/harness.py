"""What every benchmark shares: the machine description, the command line, an interleaved timer and the
results writer. Run benchmarks from the repository root as modules (``python -m benchmarks.NAME``):
``benchmarks`` then imports as a namespace package (no ``__init__.py``, so it can never shadow an installed
distribution; see tests/test_packaging.py) and no script edits ``sys.path``."""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

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
    """The command that is running, as a user would retype it (``python -m benchmarks.NAME ARGS``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"-m {spec.name}" if spec is not None and spec.name != "__main__" else os.path.relpath(sys.argv[0])
    return " ".join(["python", program, *sys.argv[1:]])


def interleaved(fns: Mapping[str, Callable[[], None]], rounds: int, per_round: int = 1,
                warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each ``fns[name]()`` call: ``warmup`` untimed calls each, then ``rounds`` rounds in which
    every contender runs ``per_round`` timed calls in turn, so drift of a shared machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return times


def write_results(out: str | Path, name: str, result: dict, markdown: str) -> tuple[Path, Path]:
    """``OUT/NAME.json`` (the result, which should hold ``command`` and ``machine``) and ``OUT/NAME.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{name}.json", out / f"{name}.md"
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown.rstrip() + "\n")
    return paths
