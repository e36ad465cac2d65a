"""Where a child training step's time goes: torch.profiler summary of a few steps.

    python -m benchmarks.profile_step --hidden 512 --backend native --steps 3

Splits the step into matmul time (aten mm/addmm/bmm self time) and everything else (by op, with
the op's share of the step), and reports the matmuls' achieved rate against a same-run square GEMM
probe. The native attention op runs its own GEMMs inside one C++ call: it is counted as non-matmul
here (conservative), its FLOP share is printed beside it. Writes
benchmarks/results/profile_h{H}_{backend}.md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import command_line, describe
from benchmarks.step_models import StepConfig, gemm_probe, make_batch, nasfast_steps

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::_addmm_activation"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--backend", default="native")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--static", action="store_true", help="profile the static model instead of the child")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sc = StepConfig(hidden=args.hidden)
    batch = make_batch(sc)
    steps = {s.name: s for s in nasfast_steps(sc, batch, [args.backend])}
    step = steps[f"nasfast {'static' if args.static else 'child'} [{args.backend}]"]
    probe = gemm_probe()
    for _ in range(2):
        step.run()
    gemm_rate = statistics.median(probe() for _ in range(5))
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step.run()
            walls.append(time.perf_counter() - t0)
    gemm_rate = statistics.median([gemm_rate, *(probe() for _ in range(4))])
    unprofiled = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step.run()
        unprofiled.append(time.perf_counter() - t0)

    events = prof.key_averages()
    total_us = sum(walls) * 1e6
    rows = sorted(((e.key, e.self_cpu_time_total, e.count) for e in events), key=lambda r: -r[1])
    mm_us = sum(t for k, t, _ in rows if k in MATMUL_OPS)
    attn_flops = 3 * 4 * sc.seq * sc.seq * sc.hidden * sc.batch * sc.bert_layers  # QK^T + PV, fwd+bwd
    mm_flops = step.flops - (attn_flops if args.backend != "eager" else 0)
    n = args.steps
    step_s = statistics.median(unprofiled)
    lines = [
        f"# Profile of one H={args.hidden} {'static' if args.static else 'child'} training step, backend {args.backend}",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {describe()['cpu_model']}, {describe()['logical_cpus']} cores, torch {torch.__version__}, "
        f"{args.threads} threads; load average {describe()['load_average_1_5_15min']}  ",
        f"Model: {sc.bert_layers} BERT layers (mha:{sc.n_heads} + ffn:{sc.n_inner}), B={sc.batch}, T={sc.seq}, "
        f"vocab {sc.vocab}, fp32, AdamW + clip.",
        "",
        f"- step wall time: {statistics.median(walls):.3f} s under the profiler, {step_s:.3f} s without",
        f"- GEMM probe (2048^3 fp32): {gemm_rate / 1e9:.1f} GFLOP/s",
        f"- step: {step.flops / 1e9:.1f} GFLOP (fwd+bwd matmuls) -> {step.flops / step_s / gemm_rate:.3f} of the GEMM rate (unprofiled)",
        f"- matmul ops (aten mm/addmm/bmm): {mm_us / total_us:.1%} of the profiled step; "
        f"they ran {mm_flops / (mm_us / n / 1e6) / 1e9:.1f} GFLOP/s = {mm_flops / (mm_us / n / 1e6) / gemm_rate:.2f} of the probe",
        f"- outside them: {1 - mm_us / total_us:.1%} (attention's own GEMMs are {attn_flops / step.flops:.1%} of the FLOPs"
        f"{' and sit inside nasfast::attention_*' if args.backend != 'eager' else ''})",
        "",
        "| op (self time) | ms / step | share of step | calls / step |",
        "| --- | --- | --- | --- |",
    ]
    for key, t, count in rows[: args.top]:
        lines.append(f"| `{key}` | {t / n / 1e3:.1f} | {t / total_us:.1%} | {count / n:.0f} |")
    other = sum(t for _, t, _ in rows[args.top:])
    lines.append(f"| (other ops) | {other / n / 1e3:.1f} | {other / total_us:.1%} | |")
    untracked = total_us - sum(t for _, t, _ in rows)
    lines.append(f"| (wall time outside any op: Python, autograd engine) | {untracked / n / 1e3:.1f} | {untracked / total_us:.1%} | |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"profile_h{args.hidden}_{args.backend}{'_static' if args.static else ''}.md"
    (out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
