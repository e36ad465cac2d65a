"""Native C++ ops vs eager references: forward and forward+backward time and peak memory per op.

    OMP_NUM_THREADS=2 python -m benchmarks.native_vs_eager [--repeats 30] [--widths tiny base]

Writes benchmarks/results/native_vs_eager.{csv,json,md}.
- Time: each measurement is one call (fwd under no_grad, or fwd + backward with a fixed random
  grad_output); backends are interleaved call by call so machine noise hits both alike; median and
  p20/p80 over --repeats after 3 warm-up calls. ratio = eager median / native median (> 1: native faster).
- Peak memory: Linux peak RSS (VmHWM) of one fwd+bwd call above the RSS before it, after resetting the
  peak with /proc/self/clear_refs ("5"). The script re-executes itself with MALLOC_MMAP_THRESHOLD_=131072
  so glibc serves every tensor >= 128 KiB with its own mmap and returns it on free (otherwise glibc's
  dynamic threshold keeps freed tensors in the heap and the peak reads ~0); RSS then tracks live tensor
  memory (activations saved for backward + temporaries + grads). Small cached allocations are not
  counted. Reported in MiB; empty where clear_refs is not writable. The timings run under the same
  setting, so every large tensor is freshly page-faulted for both backends (as with a cold allocator).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

from benchmarks.bench_cases import OPS, WIDTHS, machine, make_case
from benchmarks.harness import command_line, interleaved
from nasfast.kernels.registry import get_ops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.5


def _quantile(xs, q):
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_mib(case, ops):
    """Peak RSS above the starting RSS during one fwd+bwd call (MiB), or None."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    case.run(ops, True)
    return (_rss_kib("VmHWM") - before) / 1024.0


def measure(case, opsets, backward, repeats):
    return interleaved({name: (lambda ops=ops: case.run(ops, backward)) for name, ops in opsets.items()},
                       rounds=repeats, warmup=3)


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see the docstring (peak memory)
        argv = ["-m", __spec__.name, *sys.argv[1:]] if __spec__ is not None else sys.argv  # as it was started
        os.execve(sys.executable, [sys.executable, *argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    args = ap.parse_args()

    import nasfast.kernels.native as native

    if not native.available():
        sys.exit(f"native ops unavailable: {native.why_unavailable()}")
    opsets = {"eager": get_ops("eager"), "native": get_ops("native")}
    skipped = [op for op in args.ops if op not in opsets["native"].fused]
    if skipped:  # they would time the eager reference twice
        print(f"not implemented by the native backend (skipped): {', '.join(skipped)}", flush=True)
    rows = []
    for width in args.widths:
        for op in [o for o in args.ops if o not in skipped]:
            case = make_case(op, width)
            mem = {name: peak_mib(case, ops) for name, ops in opsets.items()}
            for phase, backward in (("fwd", False), ("fwd+bwd", True)):
                times = measure(case, opsets, backward, args.repeats)
                row = {"op": op, "width": width, "shape": case.shape, "phase": phase}
                for name, ts in times.items():
                    ms = [t * 1e3 for t in ts]
                    row[f"{name}_median_ms"] = round(statistics.median(ms), 4)
                    row[f"{name}_p20_ms"] = round(_quantile(ms, 0.2), 4)
                    row[f"{name}_p80_ms"] = round(_quantile(ms, 0.8), 4)
                row["ratio"] = round(row["eager_median_ms"] / row["native_median_ms"], 3)
                if backward:
                    row["eager_peak_mib"] = None if mem["eager"] is None else round(mem["eager"], 2)
                    row["native_peak_mib"] = None if mem["native"] is None else round(mem["native"], 2)
                    row["goal_met"] = row["ratio"] >= GOAL
                rows.append(row)
                print(f"{width:5s} {op:22s} {phase:8s} eager {row['eager_median_ms']:9.3f} ms  "
                      f"native {row['native_median_ms']:9.3f} ms  x{row['ratio']:.2f}", flush=True)

    command = f"OMP_NUM_THREADS={machine()['omp_num_threads']} {command_line()}"
    meta = {"command": command, "machine": machine(), "repeats": args.repeats, "goal_fwd_bwd_ratio": GOAL,
            "gemm_backend": native.gemm_backend(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else 99)
    with open(RESULTS / "native_vs_eager.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (RESULTS / "native_vs_eager.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    m = meta["machine"]
    md = [
        "# native (C++) vs eager: per-op time and peak memory",
        "",
        f"- command: `{command}`",
        f"- machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, ISA {'/'.join(m['isa'])}, "
        f"torch {m['torch']} ({m['torch_threads']} threads, OMP_NUM_THREADS={m['omp_num_threads']}, "
        f"capability {m['cpu_capability']}), attention GEMM: {meta['gemm_backend']}",
        f"- load average (1/5/15 min) when the run ended: {m['load_average_1_5_15min']} "
        "(the 2 cores are shared with other jobs: expect noise; the two backends are interleaved)",
        f"- {args.repeats} timed calls per cell after 3 warm-up calls, backends interleaved; "
        f"median [p20, p80] in ms; ratio = eager / native median; goal: fwd+bwd ratio >= {GOAL}",
        "- peak: VmHWM above starting RSS during one fwd+bwd call (MiB), see the script's docstring; "
        "the process runs with MALLOC_MMAP_THRESHOLD_=131072 (large tensors mmapped), timings included",
        f"- date: {meta['date']}",
        "",
        "| width | op | shape | phase | eager ms | native ms | ratio | eager peak MiB | native peak MiB | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['width']} | {r['op']} | {r['shape']} | {r['phase']} | "
            f"{r['eager_median_ms']:.3f} [{r['eager_p20_ms']:.3f}, {r['eager_p80_ms']:.3f}] | "
            f"{r['native_median_ms']:.3f} [{r['native_p20_ms']:.3f}, {r['native_p80_ms']:.3f}] | "
            f"{r['ratio']:.2f} | {r.get('eager_peak_mib', '') if r['phase'] == 'fwd+bwd' else ''} | "
            f"{r.get('native_peak_mib', '') if r['phase'] == 'fwd+bwd' else ''} | "
            f"{('met' if r['goal_met'] else 'NOT met') if r['phase'] == 'fwd+bwd' else ''} |"
        )
    (RESULTS / "native_vs_eager.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS}/native_vs_eager.{{csv,json,md}}")


if __name__ == "__main__":
    main()
