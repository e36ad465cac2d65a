"""The fair, powered test of MAGIC's rank-correlation claim (protocol: results/magic_test/protocol.md).

    python -m experiments.magic_test prepare            # pinned data, child sets, resolved config (once)
    OMP_NUM_THREADS=1 python -m experiments.magic_test work --worker gt      # ground truth, 2 seeds x 2 sets
    OMP_NUM_THREADS=1 python -m experiments.magic_test work --worker train   # supernets + their estimates
    python -m experiments.magic_test analyze            # tables, bootstrap CIs, plots from whatever is done

Everything is resumable and idempotent: a supernet whose estimates are in the results folder is
never retrained; ground truth is cached per child by ``nasfast ground-truth``; an interrupted
supernet resumes from its checkpoint. The small outputs that matter (ground-truth cache entries,
estimates, anchor histories) are written straight into ``experiments/results/magic_test`` so a later
session on another machine continues from the committed files; only checkpoints live in --work.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "magic_test"
CONFIG = ROOT / "configs" / "magic_test.yaml"
SEEDS = (0, 1, 2, 3, 4)
GT_SEEDS = (0, 1)
GT_STEPS = 1000
DEV_BATCHES = 12  # = train.eval_batches: the 384 evaluation dev blocks
HARD_N, HARD_SEED = 40, 10


def jobs() -> list[dict]:
    """Every supernet of the protocol, in priority order (main comparison first)."""
    out = [{"name": f"{s}-s{seed}", "sampler": s, "seed": seed, "set": []}
           for seed in SEEDS for s in ("spos", "magic-t", "magic-a", "magic")]
    out += [{"name": f"{s}-balanced-s{seed}", "sampler": s, "seed": seed, "set": ["sampler.walk=balanced"]}
            for seed in SEEDS for s in ("magic-t", "magic")]
    out += [{"name": f"magic-a-lambda{lam}-s{seed}", "sampler": "magic-a", "seed": seed, "set": [f"align.weight={lam}"]}
            for seed in (0, 1) for lam in (0.03, 0.3)]
    return out


def has_conv(arch_id: str) -> bool:
    return any(op.startswith("conv:") for op in arch_id.split("|"))


def overrides() -> list[str]:
    return [f"data.prepared={RESULTS / 'data'}"]


# --- prepare -----------------------------------------------------------------------------------
def prepare(args) -> None:
    from nasfast.config import load_config, save_config
    from nasfast.data.blocks import build_corpus
    from nasfast.space.checks import build_space

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = RESULTS / "data"
    if not (data / "blocks.npz").is_file():
        cfg = load_config(CONFIG)
        tmp = args.work / "prepare"
        shutil.rmtree(tmp, ignore_errors=True)
        build_corpus(cfg.data, tmp)
        saved = np.load(tmp / "data" / "blocks.npz")
        (data / "tokenizer").mkdir(parents=True, exist_ok=True)
        for f in (tmp / "data" / "tokenizer").iterdir():
            shutil.copy(f, data / "tokenizer" / f.name)
        np.savez_compressed(data / "blocks.npz", train=saved["train"], dev=saved["dev"])
        print(f"pinned data -> {data}")
    cfg = load_config(CONFIG, overrides())
    space = build_space(cfg)
    hard = RESULTS / "archs_hard.txt"
    if not hard.is_file():
        rng, chosen = random.Random(HARD_SEED), []
        while len(chosen) < HARD_N:
            arch_id = space.arch_id(space.random_arch(rng))
            if has_conv(arch_id) and arch_id not in chosen:
                chosen.append(arch_id)
        hard.write_text("\n".join(chosen) + "\n")
    easy = RESULTS / "archs_easy.txt"
    if not easy.is_file():
        old = json.loads((ROOT / "experiments" / "results" / "paper_repro" / "results.json").read_text())["archs"]
        easy.write_text("\n".join(old) + "\n")
    base = args.work / "base"  # the run folder that defines the ground-truth protocol (config + data)
    if not (base / "data" / "blocks.npz").is_file():
        base.mkdir(parents=True, exist_ok=True)
        save_config(cfg, base / "config.yaml")
        build_corpus(cfg.data, base)
    save_config(load_config(CONFIG), RESULTS / "config.yaml")
    print(f"children: {hard} ({HARD_N}), {easy}; ground-truth base run: {base}")


# --- workers -----------------------------------------------------------------------------------
class Nasfast:
    """Runs ``nasfast`` commands in-process and logs each command line with its wall time."""

    def __init__(self, log: Path):
        self.log = log

    def __call__(self, *argv: str) -> None:
        import shlex

        from nasfast.cli.app import main

        line = "nasfast " + shlex.join(argv)
        print(f"\n$ {line}", flush=True)
        started = time.perf_counter()
        rc = main(list(argv))
        with open(self.log, "a") as fh:
            fh.write(json.dumps({"command": line, "wall_s": round(time.perf_counter() - started, 1), "rc": rc,
                                 "at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        if rc != 0:
            raise SystemExit(f"command failed with exit status {rc}: {line}")


def gt_worker(args, nasfast: Nasfast) -> None:
    for child_set in ("hard", "easy"):
        for seed in GT_SEEDS:
            out = RESULTS / "ground_truth" / f"{child_set}-s{seed}"
            nasfast("ground-truth", "--run", str(args.work / "base"), "--archs", str(RESULTS / f"archs_{child_set}.txt"),
                    "--steps", str(GT_STEPS), "--seed", str(seed), "--dev-batches", str(DEV_BATCHES), "--out", str(out),
                    "--no-progress")


def anchor_history(metrics: Path) -> list[dict]:
    keys = ("step", "anchor", "anchor_score", "challenger_score", "anchor_changed", "child")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in keys} for r in rows if "anchor" in r]


def train_worker(args, nasfast: Nasfast) -> None:
    for job in jobs():
        if args.only and job["name"] not in args.only:
            continue
        estimates = RESULTS / "estimates" / f"{job['name']}.json"
        if estimates.is_file():
            continue
        run = args.work / "runs" / job["name"]
        summary = run / "summary.json"
        done = summary.is_file() and json.loads(summary.read_text()).get("status") == "completed"
        if not done:
            if (run / "checkpoints" / "last.pt").is_file():  # the run's saved config, unchanged
                nasfast("pretrain", "--out", str(run), "--resume", "--no-progress")
            else:
                shutil.rmtree(run, ignore_errors=True)  # killed before its first checkpoint: start clean
                sets = [x for s in overrides() + job["set"] + [f"train.seed={job['seed']}"] for x in ("--set", s)]
                nasfast("pretrain", "--config", str(CONFIG), "--out", str(run), "--sampler", job["sampler"], *sets, "--no-progress")
        info = {"job": job, "summary": json.loads(summary.read_text())}
        if (run / "metrics.jsonl").is_file():
            info["anchor_history"] = anchor_history(run / "metrics.jsonl")
        (RESULTS / "runs").mkdir(parents=True, exist_ok=True)
        (RESULTS / "runs" / f"{job['name']}.json").write_text(json.dumps(info, indent=1))
        parts = []
        for child_set in ("hard", "easy"):
            part = run / f"estimates_{child_set}.json"
            if not part.is_file():
                nasfast("evaluate", "--run", str(run), "--archs", str(RESULTS / f"archs_{child_set}.txt"), "--dev-batches",
                        str(DEV_BATCHES), "--out", str(part), "--no-progress")
            parts.append(json.loads(part.read_text()))
        merged = {**parts[0], "results": parts[0]["results"] + parts[1]["results"]}
        estimates.parent.mkdir(parents=True, exist_ok=True)
        tmp = estimates.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        tmp.rename(estimates)  # last: its presence marks the job done
    if not args.only:
        interference_worker(args, nasfast)


def interference_worker(args, nasfast: Nasfast) -> None:
    """Observations 1 and 2 on the first spos supernet (needs its checkpoint in --work)."""
    run = args.work / "runs" / "spos-s0"
    for cand in ("mha:2", "ffn:128"):
        out = RESULTS / "interference" / f"layer2-{cand.replace(':', '')}"
        if (out / "interference.json").is_file() or not (run / "checkpoints" / "last.pt").is_file():
            continue
        nasfast("interference", "--run", str(run), "--layer", "2", "--candidate", cand, "--bases", "8",
                "--partners-per-distance", "4", "--batches", "2", "--out", str(out), "--no-progress")


def work(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    nasfast = Nasfast(RESULTS / f"commands_{args.worker}.jsonl")
    (gt_worker if args.worker == "gt" else train_worker)(args, nasfast)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("prepare", "work", "analyze"))
    p.add_argument("--worker", choices=("gt", "train"), default="train")
    p.add_argument("--only", nargs="*", help="train only these job names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/work/magic_work"), help="run folders and checkpoints")
    p.add_argument("--bootstrap", type=int, default=4000, help="bootstrap replicates (analyze)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "prepare":
        prepare(args)
    elif args.stage == "work":
        work(args)
    else:
        from experiments.magic_test_analysis import analyze

        analyze(RESULTS, args.bootstrap)


if __name__ == "__main__":
    main()
