"""Training-step time of MAGIC-T, MAGIC-A and MAGIC relative to SPOS, measured side by side.

    python benchmarks/magic_step_time.py --config configs/tiny.yaml --steps 30 --rounds 3

Each variant is a real Trainer on the same corpus; rounds interleave the variants so machine drift
hits all of them alike. A step includes everything training pays for: data collation, forward,
alignment (with its anchor forward), backward, optimizer, and the amortised anchor challenges.
Writes benchmarks/results/magic_step_time.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe  # noqa: E402

VARIANTS = {
    "spos": [],
    "magic-t": [],
    "magic-a": [],
    "magic-a (no prefix sharing)": ["sampler.prefix_sharing=false"],
    "magic": [],
    "magic (no prefix sharing)": ["sampler.prefix_sharing=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="config override for every variant")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bar()
    from nasfast.config import load_config
    from nasfast.trainer import Trainer

    trainers, times = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            sampler = name.split(" ")[0]
            cfg = load_config(args.config, [*args.set, f"sampler.name={sampler}", *extra])
            trainers[name] = Trainer(cfg, Path(tmp) / name.replace(" ", "_"), progress=False)
            times[name] = []
        step = 0
        for name, tr in trainers.items():  # warm-up: allocator, first anchor score, caches
            for s in range(args.warmup):
                tr.train_step(s)
        step = args.warmup
        for _ in range(args.rounds):
            for name, tr in trainers.items():
                for s in range(step, step + args.steps):
                    t0 = time.perf_counter()
                    tr.train_step(s)
                    times[name].append(time.perf_counter() - t0)
            step += args.steps
        anchor_every = {n: tr.cfg.sampler.anchor_every for n, tr in trainers.items()}

    base = statistics.median(times["spos"])
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        rows.append({
            "variant": name, "median_s": statistics.median(ts), "p20_s": q[0], "p80_s": q[3],
            "mean_s": statistics.fmean(ts), "ratio_vs_spos": statistics.median(ts) / base, "steps": len(ts),
        })
    result = {"command": command_line(), "machine": describe(), "config": args.config, "overrides": args.set,
              "anchor_every": anchor_every["magic"], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "magic_step_time.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Training-step time: MAGIC variants vs SPOS",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu_model']}, {result['machine']['logical_cpus']} cores, torch {result['machine']['torch']}"
        f" ({result['machine']['torch_threads']} threads)  ",
        f"Anchor challenge every {result['anchor_every']} steps (amortised in the step times).",
        "",
        "| variant | median step (s) | p20–p80 (s) | ratio vs spos |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['p20_s']:.3f}–{r['p80_s']:.3f} | {r['ratio_vs_spos']:.2f} |")
    (out / "magic_step_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
