"""Training-step time of MAGIC-T, MAGIC-A and MAGIC relative to SPOS, measured side by side.

    python -m benchmarks.magic_step_time --config configs/tiny.yaml --steps 20 --rounds 3 --backends eager,native

Each variant is a real Trainer on the same corpus; rounds interleave the variants so machine drift
hits all of them alike. A step includes everything training pays for: data collation, forward,
alignment (with its anchor forward), backward, optimizer, and the amortised anchor challenges.
The anchor warm-up is set to 0 steps (``align.anchor_warmup=0``, before any --set) so that every
timed step aligns: with the default warm-up (10% of train.steps, 80 steps for tiny.yaml) the
short timed window would fall inside it and measure plain MLM steps. magic-a trains the same
children as spos (same sampler and seed) and magic the same as magic-t, so "ratio vs same children"
isolates the alignment's own cost from the cost of the children each sampler happens to pick.
"no challenge" sets anchor_every past the run (what the amortised challenges cost); "bf16 anchor"
runs the anchor's forward under bf16 autocast (``align.anchor_precision=bf16``). ``--variants``
picks a subset (spos always), e.g. for the H=512 table::

    python -m benchmarks.magic_step_time --steps 6 --rounds 3 --warmup 2 --backends eager,native \
        --variants "spos,magic-a,magic-a (no challenge),magic-a (bf16 anchor)" \
        --set model.hidden=512 --set "space.candidates=[mha:8, ffn:2048]" --name magic_step_time_h512

Writes benchmarks/results/{--name}.{json,md} (default magic_step_time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.harness import command_line, describe, interleaved

VARIANTS = {
    "spos": [],
    "magic-t": [],
    "magic-a": [],
    "magic-a (no prefix sharing)": ["align.prefix_sharing=false"],
    "magic": [],
    "magic (no prefix sharing)": ["align.prefix_sharing=false"],
    # where the cost goes: without the amortised anchor challenge (scores two children every anchor_every)
    "magic-a (no challenge)": ["align.anchor_every=1000000000"],
    # the anchor's no-grad forward under bf16 autocast (align.anchor_precision=bf16)
    "magic-a (bf16 anchor)": ["align.anchor_precision=bf16"],
    "magic (bf16 anchor)": ["align.anchor_precision=bf16"],
}


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="config override for every variant")
    parser.add_argument("--backends", default="eager", help="comma-separated kernels.backend values, timed side by side")
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--name", default="magic_step_time", help="results file stem")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "spos" not in chosen:
        parser.error("--variants must include spos (every ratio is against it)")

    import datasets

    datasets.disable_progress_bar()
    from nasfast.config import load_config
    from nasfast.training.trainer import Trainer

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for variant in chosen:
                extra = VARIANTS[variant]
                name = f"{variant} [{backend}]" if len(backends) > 1 else variant
                sampler = variant.split(" ")[0]
                cfg = load_config(args.config, ["align.anchor_warmup=0", *args.set, f"kernels.backend={backend}",
                                                f"sampler.name={sampler}", *extra])
                trainers[name] = Trainer(cfg, Path(tmp) / f"{len(trainers)}", progress=False)

        def next_step(tr, counter):  # each trainer walks its own steps 0, 1, 2, ... (warm-up included)
            tr.train_step(counter[0])
            counter[0] += 1

        # the warm-up steps warm the allocator, the first anchor score and caches
        times = interleaved({name: (lambda tr=tr, c=[0]: next_step(tr, c)) for name, tr in trainers.items()},
                            args.rounds, per_round=args.steps, warmup=args.warmup)
        anchor_every = {n: tr.cfg.align.anchor_every for n, tr in trainers.items()}
        backend_of = {n: tr.model.ops.name for n, tr in trainers.items()}

    spos = {backend_of[n]: statistics.median(ts) for n, ts in times.items() if n.split(" ")[0] == "spos"}
    same_children = {"magic-a": "spos", "magic": "magic-t"}  # the sampler whose children a variant trains
    base_of = {(n.split(" ")[0], backend_of[n]): statistics.median(ts) for n, ts in times.items() if "(" not in n}
    eager_spos = spos.get("eager")
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        med = statistics.median(ts)
        rows.append({
            "variant": name, "backend": backend_of[name], "median_s": med, "p20_s": q[0], "p80_s": q[3],
            "mean_s": statistics.fmean(ts), "ratio_vs_spos": med / spos[backend_of[name]],
            "ratio_vs_same_children": (med / base) if (base := base_of.get(
                (same_children.get(name.split(" ")[0], name.split(" ")[0]), backend_of[name]))) else None,
            "speedup_vs_eager_spos": (eager_spos / med) if eager_spos else None, "steps": len(ts),
        })
    result = {"command": command_line(), "machine": describe(), "config": args.config, "overrides": args.set,
              "anchor_every": next(iter(anchor_every.values())), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Training-step time: MAGIC variants vs SPOS",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu_model']}, {result['machine']['logical_cpus']} cores, torch {result['machine']['torch']}"
        f" ({result['machine']['torch_threads']} threads)  ",
        f"Config: `{args.config}`, overrides {args.set or 'none'} (+ align.anchor_warmup=0).  ",
        f"Anchor challenge every {result['anchor_every']} steps (amortised in the step times; never in the"
        " no-challenge rows).",
        "",
        "Ratio vs spos: against spos on the same backend. Speed-up: eager spos step time / this step time.",
        "",
        "Ratio vs same children: magic-a / spos and magic / magic-t (the same children, so the alignment's own cost).",
        f"Load average (1/5/15 min) at the end: {result['machine']['load_average_1_5_15min']}.",
        "",
        "| variant | backend | median step (s) | p20–p80 (s) | ratio vs spos | ratio vs same children | speed-up vs eager spos |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        speed = f"{r['speedup_vs_eager_spos']:.2f}" if r["speedup_vs_eager_spos"] else "—"
        lines.append(f"| {r['variant']} | {r['backend']} | {r['median_s']:.3f} | {r['p20_s']:.3f}–{r['p80_s']:.3f} "
                     f"| {r['ratio_vs_spos']:.2f} | {_fmt(r['ratio_vs_same_children'])} | {speed} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
