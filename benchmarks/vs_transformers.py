"""A nasfast child's training step vs transformers' BertForMaskedLM of equal dims, side by side.

    python -m benchmarks.vs_transformers --hidden 128,512 --rounds 5 --steps 2 --threads 2

At each hidden size H: L BERT layers (default 3, i.e. 6 nasfast sub-layers mha:H/64 + ffn:4H), B=32,
T=128, vocab 8192, fp32, one fixed batch (15% of positions labelled), AdamW + clipping through
``nasfast.training.optim`` for every contender (see benchmarks/step_models.py). Contenders:
transformers eager, transformers with its head only at the labelled positions (nasfast's work),
transformers under torch.compile, the nasfast child on each available backend, and its static model.

Timing: rounds interleave every contender (and a square fp32 GEMM probe), each runs --steps steps
per round; a contender's time is the median over rounds of its per-round median step. "GEMM
fraction" = the contender's own fwd+bwd matmul FLOPs / step time / the probe's median rate.
Writes benchmarks/results/vs_transformers.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.harness import command_line, describe
from benchmarks.step_models import StepConfig, gemm_probe, hf_step, make_batch, nasfast_steps


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "")
    except Exception:
        return ""


class _Timeout(Exception):
    pass


def _with_timeout(seconds: int, fn):
    """fn() or _Timeout after ``seconds`` (SIGALRM; main thread, POSIX)."""
    def handler(signum, frame):
        raise _Timeout(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def available_backends(device: str) -> list:
    from nasfast.kernels.registry import get_ops

    out = ["eager"]
    for name in ("native", "triton"):
        try:
            ops = get_ops(name, device)
            if ops.fused:
                out.append(name)
        except Exception:
            pass
    return out


def build_all(sc: StepConfig, batch: dict, backends: list, compile_timeout: int, skip_compile: bool) -> tuple[list, list]:
    steps, skipped = [], []
    steps.append(hf_step(sc, batch))
    steps.append(hf_step(sc, batch, masked_head=True))
    if skip_compile:
        skipped.append({"name": "transformers BertForMaskedLM + torch.compile(default)", "reason": "--no-compile"})
    else:
        try:
            steps.append(_with_timeout(compile_timeout, lambda: hf_step(sc, batch, compile_mode="default")))
        except Exception as exc:  # record why, keep benchmarking the rest
            skipped.append({"name": "transformers BertForMaskedLM + torch.compile(default)",
                            "reason": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}",
                            "trace_tail": traceback.format_exc()[-1500:]})
    steps.extend(nasfast_steps(sc, batch, backends))
    return steps, skipped


def measure(steps: list, rounds: int, per_round: int, warmup: int, probe) -> tuple[dict, list]:
    for s in steps:
        for _ in range(warmup):
            s.run()
    rates, per_round_medians = [], {s.name: [] for s in steps}
    for _ in range(rounds):
        rates += [probe() for _ in range(3)]
        for s in steps:
            ts = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run()
                ts.append(time.perf_counter() - t0)
            per_round_medians[s.name].append(statistics.median(ts))
    return per_round_medians, rates


NOTES_MARKER = "<!-- notes below this line are kept when the tables above are regenerated -->"


def _kept_notes(md: Path) -> str:
    """The hand-written analysis after NOTES_MARKER in an existing results file (goals, reasons)."""
    if not md.exists():
        return ""
    text = md.read_text()
    at = text.find(NOTES_MARKER)
    return "" if at < 0 else "\n" + text[at:]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="128,512")
    parser.add_argument("--layers", type=int, default=3, help="BERT layers (each = 2 nasfast sub-layers)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gemm-n", type=int, default=2048)
    parser.add_argument("--compile-timeout", type=int, default=900, help="seconds allowed for torch.compile's first step")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (GPU; gpu_suite.py)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="vs_transformers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start_uptime = _uptime()
    backends = available_backends(args.device)
    sections = []
    for H in [int(h) for h in args.hidden.split(",") if h.strip()]:
        sc = StepConfig(hidden=H, bert_layers=args.layers, batch=args.batch, seq=args.seq, vocab=args.vocab,
                        device=args.device, amp=None if args.dtype == "fp32" else args.dtype)
        batch = make_batch(sc, args.device)
        steps, skipped = build_all(sc, batch, backends, args.compile_timeout, args.no_compile)
        probe = gemm_probe(args.gemm_n, dtype=torch.float32 if args.dtype == "fp32" else torch.bfloat16, device=args.device)
        medians, rates = measure(steps, args.rounds, args.steps, args.warmup, probe)
        gemm = statistics.median(rates)
        base = {s.name: statistics.median(medians[s.name]) for s in steps}
        hf_t = base[steps[0].name]
        hf_masked_t = base[steps[1].name]
        rows = []
        for s in steps:
            t = base[s.name]
            rows.append({
                "name": s.name, "note": s.note, "step_s": t, "round_medians_s": medians[s.name],
                "gflop_per_step": s.flops / 1e9, "gemm_fraction": s.flops / t / gemm,
                "tokens_per_s": sc.batch * sc.seq / t, "speedup_vs_hf": hf_t / t,
                "speedup_vs_hf_masked_head": hf_masked_t / t, "setup_s": s.setup_s, **s.extra,
            })
        sections.append({"hidden": H, "config": asdict(sc) | {"heads": sc.n_heads, "inner": sc.n_inner},
                         "gemm_probe_gflops": gemm / 1e9, "gemm_probe_range_gflops": [min(rates) / 1e9, max(rates) / 1e9],
                         "rows": rows, "skipped": skipped})
        print(f"H={H}: GEMM {gemm / 1e9:.1f} GFLOP/s; " + "; ".join(f"{r['name']}: {r['step_s']:.3f}s" for r in rows), flush=True)

    result = {"command": command_line(), "machine": describe() | {"lscpu_model": _lscpu_model()},
              "uptime_start": start_uptime, "uptime_end": _uptime(), "backends": backends,
              "threads": args.threads, "dtype": args.dtype, "device": args.device, "rounds": args.rounds, "steps_per_round": args.steps, "sections": sections}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    md = out / f"{args.name}.md"
    md.write_text(render(result) + _kept_notes(md))
    print(render(result))
    return result


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Training step: nasfast child vs transformers BertForMaskedLM (equal dims)", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m.get('lscpu_model') or m['cpu_model']}, {m['logical_cpus']} logical CPUs ({', '.join(m['isa'])}), "
        f"torch {m['torch']} ({result['threads']} threads), triton {m['triton']}, transformers {m['transformers']}, "
        f"deepspeed {m['deepspeed']}; GPU: {m['gpu'] or 'none'}  ",
        f"Load: start `{result['uptime_start']}`; end `{result['uptime_end']}` (a shared machine: contenders are "
        "interleaved so load hits them alike)  ",
        f"Timing: {result['rounds']} rounds x {result['steps_per_round']} steps per contender, interleaved with a square "
        "fp32 GEMM probe; step = median over rounds of the per-round median; one step = forward + backward + "
        "clip_grad_norm(1.0) + AdamW (nasfast.training.optim, the same code for every contender).", "",
        "Work differs: BertForMaskedLM projects every position onto the vocabulary, nasfast only the labelled ~15%. "
        "GFLOP = each model's own fwd+bwd matmul FLOPs (torch.utils.flop_counter on its eager form), so the GEMM "
        "fraction compares efficiency; tokens/s compares throughput; the row \"head at masked positions\" is "
        "transformers doing nasfast's work (equal-work comparison).", "",
    ]
    for sec in result["sections"]:
        c = sec["config"]
        lines += [
            f"## H={sec['hidden']}: {c['bert_layers']} BERT layers (mha:{c['heads']} + ffn:{c['inner']}), "
            f"B={c['batch']}, T={c['seq']}, vocab {c['vocab']}, {result.get('dtype', 'fp32')}", "",
            f"GEMM probe ({'fp32' if result.get('dtype', 'fp32') == 'fp32' else result['dtype']}, {result.get('device', 'cpu')}): {sec['gemm_probe_gflops']:.1f} GFLOP/s (range {sec['gemm_probe_range_gflops'][0]:.1f}–"
            f"{sec['gemm_probe_range_gflops'][1]:.1f})", "",
            "| contender | step (s) | rounds min–max (s) | GFLOP / step | GEMM fraction | tokens/s | vs HF eager | vs HF masked head (equal work) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sec["rows"]:
            lines.append(f"| {r['name']} | {r['step_s']:.3f} | {min(r['round_medians_s']):.3f}–{max(r['round_medians_s']):.3f} "
                         f"| {r['gflop_per_step']:.1f} | {r['gemm_fraction']:.2f} | {r['tokens_per_s']:.0f} "
                         f"| {r['speedup_vs_hf']:.2f}x | {r['speedup_vs_hf_masked_head']:.2f}x |")
        for s in sec["skipped"]:
            lines.append(f"| {s['name']} | not run: {s['reason']} | | | | | | |")
        compiled = [r for r in sec["rows"] if "compile" in r["name"]]
        if compiled:
            lines.append(f"\ntorch.compile: first step (compile) took {compiled[0]['setup_s']:.0f} s, not counted in the step time.")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
