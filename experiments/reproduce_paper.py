"""CPU-scale reproduction of "Analyzing and Mitigating Interference in NAS" (protocols: docs/protocols.md).

    OMP_NUM_THREADS=1 python -m experiments.reproduce_paper [--samplers spos,magic-t,magic-a,magic] [--seeds 0 1 2]
    python -m experiments.reproduce_paper --quick      # micro setting, ~2 minutes: a smoke test of the pipeline

1. sample-archs: a seeded set of children spread over parameter counts;
2. pretrain: one supernet per (sampler, seed), all with the same config and number of steps;
3. ground-truth: each child trained from scratch once (protocol of the first seed's spos run;
   cached by arch id, so an interrupted reproduction resumes);
4. evaluate + rank: inherited-weight dev loss of every child on every supernet, Kendall τ / Spearman ρ;
5. interference: gradient similarity vs distance on the first spos supernet (observations 1 and 2).
Writes OUT/{results.json, table.md, *.png} with the exact commands and the machine description.
Every stage is a ``nasfast`` command run in-process; finished stages are skipped on a rerun.
Sampler names must be registered in nasfast.space.samplers.SAMPLERS; by default the paper's four, and
those not (yet) registered are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PAPER_SAMPLERS = ("spos", "magic-t", "magic-a", "magic")
PAPER_KENDALL = {"spos": 0.36, "magic-t": 0.49, "magic": 0.57}  # 60 children, as reported by a secondary source
QUICK_OVERRIDES = [  # the tests' micro setting
    "model.hidden=24", "model.max_len=32", "space.layers=3",
    "space.candidates=[mha:2, mha:3, ffn:40, conv:3, conv:5, identity]",
    "data.max_chars_per_file=40000", "data.vocab_size=400", "data.block_size=32", "data.dev_blocks=32",
    "train.steps=40", "train.batch_size=8", "train.warmup_steps=4", "train.log_every=10", "train.eval_every=40",
    "train.eval_batches=2", "train.eval_random_children=1", "train.ckpt_every=40", "train.device=cpu",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="base run config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--samplers", help=f"comma-separated (default: those of {','.join(PAPER_SAMPLERS)} that are registered)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="supernet training seeds (>= 3 for the paper table)")
    p.add_argument("--steps", type=int, help="supernet training steps (default: the config's train.steps)")
    p.add_argument("--children", type=int, default=24, help="children in the rank-correlation set")
    p.add_argument("--gt-steps", type=int, help="ground-truth training steps per child (default: the same as --steps)")
    p.add_argument("--interference-layer", type=int, help="0-based layer of the shared operators (default: the middle)")
    p.add_argument("--interference-candidates", help="comma-separated (default: the first mha and ffn candidates)")
    p.add_argument("--bases", type=int, default=6, help="interference base children")
    p.add_argument("--partners", type=int, default=4, help="interference partners per base and distance")
    p.add_argument("--interference-batches", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--work", help="run folders (default: WORK=/tmp/nasfast_paper_repro[_quick])")
    p.add_argument("--out", help="results folder (default experiments/results/paper_repro; with --quick WORK/results)")
    p.add_argument("--quick", action="store_true", help="micro setting, 2 seeds, 6 children: a ~2 minute smoke test")
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.work = Path(args.work or f"/tmp/nasfast_paper_repro{suffix}")
    # a smoke test never overwrites the committed results
    args.out = Path(args.out) if args.out else args.work / "results" if args.quick else ROOT / "experiments" / "results" / "paper_repro"
    if args.quick:
        args.set = QUICK_OVERRIDES + args.set
        if args.seeds == [0, 1, 2]:
            args.seeds = [0, 1]
        args.children = min(args.children, 6)
        args.bases, args.partners, args.interference_batches = min(args.bases, 2), min(args.partners, 2), 1
    return args


class Recorder:
    """Runs ``nasfast`` commands in-process and keeps the exact command lines and their wall times."""

    def __init__(self):
        self.commands: list[dict] = []

    def __call__(self, *argv: str) -> None:
        from nasfast.cli.app import main

        line = "nasfast " + shlex.join(argv)
        print(f"\n$ {line}", flush=True)
        started = time.perf_counter()
        rc = main(list(argv))
        self.commands.append({"command": line, "wall_s": round(time.perf_counter() - started, 2), "rc": rc})
        if rc != 0:
            raise SystemExit(f"command failed with exit status {rc}: {line}")


def choose_samplers(requested: str | None) -> tuple[list[str], list[str]]:
    from nasfast.space.samplers import SAMPLERS

    if requested:
        names = [s.strip() for s in requested.split(",") if s.strip()]
        unknown = [s for s in names if s not in SAMPLERS]
        if unknown:
            raise SystemExit(f"samplers not registered in nasfast.space.samplers.SAMPLERS: {', '.join(unknown)} (have {', '.join(SAMPLERS)})")
        return names, []
    return [s for s in PAPER_SAMPLERS if s in SAMPLERS], [s for s in PAPER_SAMPLERS if s not in SAMPLERS]


def pretrain(nasfast, config: Path, run: Path, sampler: str, seed: int) -> None:
    summary = run / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["status"] == "completed":
        print(f"\n(skip: {run} is complete)")
        return
    resume = ["--resume"] if (run / "checkpoints" / "last.pt").is_file() else []
    nasfast("pretrain", "--config", str(config), "--out", str(run), "--sampler", sampler, "--set", f"train.seed={seed}",
            "--no-progress", *resume)


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def plot_kendall(path: Path, samplers: list[str], per_seed: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 1.3 * len(samplers)), 3.6))
    labelled: set = set()  # each legend entry once, on the first bar / marker that has it

    def once(label: str):
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for i, s in enumerate(samplers):
        taus = [v for v in per_seed[s] if v is not None]
        if taus:
            sp = spread(taus)
            ax.bar(i, sp["mean"], yerr=sp["std"], capsize=5, color="#9bb7d4", label=once("mean ± std over seeds"))
            ax.scatter([i] * len(taus), taus, color="k", s=12, zorder=3, label=once("one seed"))
        if s in PAPER_KENDALL:
            ax.scatter([i], [PAPER_KENDALL[s]], marker="_", s=400, color="r", zorder=4, label=once("paper"))
    ax.set_xticks(range(len(samplers)), samplers)
    ax.set(ylabel="Kendall τ (loss)", title="rank correlation vs ground truth")
    ax.axhline(0, color="grey", lw=0.8)
    if labelled:
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(path: Path, results: dict) -> None:
    from nasfast.analysis.ranking import fmt

    lines = ["# Paper reproduction (CPU scale)", "", f"Generated by `{results['script']}`.", "",
             "## Rank correlation (inherited-weight vs standalone dev MLM loss)", "",
             f"{results['children']} children, supernets trained {results['steps']} steps, ground truth {results['gt_steps']} steps "
             f"per child; mean ± std over seeds {results['seeds']} (per-seed values in results.json).", "",
             "| sampler | Kendall τ | Spearman ρ | τ per seed | paper τ |", "|---|---|---|---|---|"]
    for s, r in results["rank"].items():
        k, sp = r["kendall"], r["spearman"]
        seeds = ", ".join(fmt(x["kendall"]["tau"], "+.3f") for x in r["per_seed"])
        lines.append(f"| {s} | {fmt(k['mean'], '+.3f')} ± {fmt(k['std'], '.3f')} | {fmt(sp['mean'], '+.3f')} ± {fmt(sp['std'], '.3f')} "
                     f"| {seeds} | {PAPER_KENDALL.get(s, '—')} |")
    if results["skipped_samplers"]:
        lines += ["", f"Not run (not registered in nasfast.space.samplers): {', '.join(results['skipped_samplers'])}."]
    lines += ["", "## Interference (first spos supernet)", ""]
    for item in results["interference"]:
        c = item["correlations"]
        lines.append(f"- layer {item['operator']['layer']}, {item['operator']['candidate']} ({item['pairs']} pairs): "
                     f"Spearman(d, grad cos) = {fmt(c['distance_vs_grad_cos']['rho'], '+.3f')} (p = {fmt(c['distance_vs_grad_cos']['p'], '.2g')}); "
                     f"Spearman(input sim, grad cos) = {fmt(c['input_sim_vs_grad_cos']['rho'], '+.3f')} (p = {fmt(c['input_sim_vs_grad_cos']['p'], '.2g')}); "
                     f"Spearman(output sim, grad cos) = {fmt(c['output_sim_vs_grad_cos']['rho'], '+.3f')} (p = {fmt(c['output_sim_vs_grad_cos']['p'], '.2g')})")
        for r in item["by_distance"]:
            lines.append(f"  - d = {r['distance']}: grad cos {fmt(r['grad_cos_mean'], '.4f')} ± {fmt(r['grad_cos_std'], '.4f')} (n = {r['count']})")
    lines += ["", "## Commands", "", "```"] + [f"{c['command']}   # {c['wall_s']} s" for c in results["commands"]] + ["```", "",
              "## Machine", "", "```", json.dumps(results["machine"], indent=2), "```", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.bench_cases import machine
    from nasfast.config import load_config, save_config
    from nasfast.space.checks import build_space

    started = time.perf_counter()
    samplers, skipped = choose_samplers(args.samplers)
    if not samplers:
        raise SystemExit("no sampler to run")
    if skipped:
        print(f"note: not registered yet, skipped: {', '.join(skipped)}")
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, overrides)
    space = build_space(cfg)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.work / "config.yaml"
    save_config(cfg, config)
    nasfast = Recorder()

    archs = args.work / "archs.txt"
    nasfast("sample-archs", "--config", str(config), "--n", str(args.children), "--seed", "0", "--out", str(archs))
    runs = {(s, seed): args.work / "runs" / f"{s}-s{seed}" for s in samplers for seed in args.seeds}
    for (s, seed), run in runs.items():
        pretrain(nasfast, config, run, s, seed)

    truth_run = runs[(samplers[0], args.seeds[0])]
    gt = args.work / "ground_truth"
    gt_steps = args.gt_steps or cfg.train.steps
    nasfast("ground-truth", "--run", str(truth_run), "--archs", str(archs), "--steps", str(gt_steps), "--out", str(gt), "--no-progress")

    rank: dict = {}
    for s in samplers:
        per_seed = []
        for seed in args.seeds:
            run = runs[(s, seed)]
            nasfast("evaluate", "--run", str(run), "--archs", str(archs), "--out", str(run / "estimates.json"), "--no-progress")
            nasfast("rank", "--estimates", str(run / "estimates.json"), "--truth", str(gt), "--out", str(run / "rank"))
            r = json.loads((run / "rank" / "rank.json").read_text())
            per_seed.append({"seed": seed, "kendall": r["kendall"], "spearman": r["spearman"], "run": str(run)})
        shutil.copy(runs[(s, args.seeds[0])] / "rank" / "rank_scatter.png", args.out / f"rank_scatter_{s}_seed{args.seeds[0]}.png")
        rank[s] = {"kendall": spread([x["kendall"]["tau"] for x in per_seed]),
                   "spearman": spread([x["spearman"]["rho"] for x in per_seed]), "per_seed": per_seed}
    plot_kendall(args.out / "kendall_by_sampler.png", samplers, {s: [x["kendall"]["tau"] for x in rank[s]["per_seed"]] for s in samplers})

    interference = []
    if "spos" in samplers:
        layer = space.num_layers // 2 if args.interference_layer is None else args.interference_layer
        if args.interference_candidates:
            cands = [c.strip() for c in args.interference_candidates.split(",")]
        else:
            cands = [next(c.name for c in space.candidates if c.kind == k) for k in ("mha", "ffn") if any(c.kind == k for c in space.candidates)]
        for cand in cands:
            tag = f"layer{layer}-{cand.replace(':', '')}"
            out = args.work / "interference" / tag
            nasfast("interference", "--run", str(runs[("spos", args.seeds[0])]), "--layer", str(layer), "--candidate", cand,
                    "--bases", str(args.bases), "--partners-per-distance", str(args.partners),
                    "--batches", str(args.interference_batches), "--out", str(out), "--no-progress")
            report = json.loads((out / "interference.json").read_text())
            for name in ("grad_cos_vs_distance", "grad_cos_vs_similarity"):
                shutil.copy(out / f"{name}.png", args.out / f"interference_{tag}_{name}.png")
            interference.append({"operator": report["operator"], "settings": report["settings"], "pairs": len(report["pairs"]),
                                 "by_distance": report["by_distance"], "correlations": report["correlations"], "json": str(out / "interference.json")})

    script = "python -m experiments.reproduce_paper " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = {
        "script": script.strip(), "quick": args.quick, "config": cfg.to_dict(), "samplers": samplers, "skipped_samplers": skipped,
        "seeds": args.seeds, "steps": cfg.train.steps, "gt_steps": gt_steps, "children": args.children,
        "archs": archs.read_text().split(), "ground_truth": json.loads((gt / "ground_truth.json").read_text())["results"],
        "rank": rank, "paper_kendall": PAPER_KENDALL, "interference": interference, "commands": nasfast.commands,
        "machine": {**machine(), "python": sys.version.split()[0], "git": git_state()},
        "wall_time_s": round(time.perf_counter() - started, 1), "work": str(args.work),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_table(args.out / "table.md", results)
    print(f"\n{results['wall_time_s']} s -> {args.out}/results.json, table.md, *.png")


if __name__ == "__main__":
    main()
