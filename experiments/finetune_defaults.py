"""``nasfast finetune`` defaults, before and after issue 18 item 4: the 2.4k-row TSV and the report.

    python -m experiments.finetune_defaults make-task --out runs/tasks/sentiment2400.tsv
    (the finetune commands in experiments/results/finetune_defaults/README.md, OUT = runs/ft/{before,after}-TASK)
    python -m experiments.finetune_defaults report --runs runs/ft --out experiments/results/finetune_defaults

The TSV is the first 2,400 rows of the embedded sentiment training split (already shuffled) with the labels
renamed 0 -> negative, 1 -> positive, so ``finetune`` carves its own 80/10/10 split (--split-seed 0) and
maps string labels, as a user's small task would.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sentiment2400", "sentiment", "wic")
SETTINGS = ("before", "after")


def make_task(out: Path, rows: int = 2400) -> None:
    lines = gzip.decompress((ROOT / "nasfast/tasks/mr_sentiment_train.tsv.gz").read_bytes()).decode().splitlines()
    header = lines[0].split("\t")
    li, si = header.index("label"), header.index("sentence")
    names = {"0": "negative", "1": "positive"}
    body = [line.split("\t") for line in lines[1 : rows + 1]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("label\tsentence\n" + "".join(f"{names[r[li]]}\t{r[si]}\n" for r in body))
    print(f"{len(body)} rows -> {out}")


def machine() -> dict:
    import torch
    import transformers

    model = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if l.startswith("Model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def pct(values: list) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * sd:.1f}"


def report(runs: Path, out: Path) -> None:
    rows, table = {}, []
    for task in TASKS:
        for setting in SETTINGS:
            path = runs / f"{setting}-{task}" / "results.json"
            if not path.is_file():
                continue
            res = json.loads(path.read_text())
            maj = res["majority_baseline"]
            # Old results.json files have no dev_best_constant: recompute the warning's bar from the seeds' splits.
            bar = maj.get("dev_best_constant", {}).get("accuracy", max(maj["dev"], 1 - maj["dev"]) if len(res["labels"]) == 2 else maj["dev"])
            seeds = res["seeds"]
            stuck = [s["seed"] for s in seeds if s["dev_accuracy"] <= bar]
            s = res["settings"]
            # The old code recorded no step count: an epoch run is ceil(rows / batch) steps an epoch.
            steps = s.get("steps") or math.ceil(math.ceil(res["examples"]["train"] / s["batch_size"]) * s["epochs"])
            length = f"{steps} steps" if s.get("steps") else f"{s['epochs']:g} epochs = {steps} steps"
            rows[f"{setting}-{task}"] = {
                "task": task, "setting": setting, "length": length, "lr": s["lr"], "examples": res["examples"],
                "optimizer_steps": steps, "dev_accuracy": [x["dev_accuracy"] for x in seeds],
                "test_accuracy": [x["test_accuracy"] for x in seeds], "majority_test": maj["test"], "majority_dev_bar": bar,
                "seeds_no_better_than_majority": stuck, "train_time_s": [x["train_time_s"] for x in seeds]}
            r = rows[f"{setting}-{task}"]
            table.append(f"| {task} | {setting}: {length}, lr {s['lr']:g} | {res['examples']['train']} | "
                         f"{pct(r['dev_accuracy'])} | {pct(r['test_accuracy'])} | {100 * maj['test']:.1f} | "
                         f"{len(stuck)}/{len(seeds)} | {statistics.fmean(r['train_time_s']):.0f} |")
    # The choice of the new defaults: seed 0 on the 2.4k-row task, read on dev (runs/ft/sweep-STEPS-LR).
    sweep = []
    for path in sorted(runs.glob("sweep-*/results.json")) + [runs / "after-sentiment2400/results.json"]:
        res = json.loads(path.read_text())
        seed = next(x for x in res["seeds"] if x["seed"] == 0)
        sweep.append({"steps": res["settings"]["steps"], "lr": res["settings"]["lr"], "dev_accuracy": seed["dev_accuracy"],
                      "test_accuracy": seed["test_accuracy"], "best_step": seed["best_step"]})
    sweep.sort(key=lambda r: (r["steps"], r["lr"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": machine(), "runs": rows, "sweep_sentiment2400_seed0": sweep}, indent=2) + "\n")
    print("| task | settings | train rows | dev acc % | test acc % | majority test % | seeds flagged | train s/seed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(table))
    print("\n| steps | lr | dev acc % | test acc % | best step |\n| --- | --- | --- | --- | --- |")
    for r in sweep:
        print(f"| {r['steps']} | {r['lr']:g} | {100 * r['dev_accuracy']:.1f} | {100 * r['test_accuracy']:.1f} | {r['best_step']} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-task")
    p.add_argument("--out", type=Path, default=ROOT / "runs/tasks/sentiment2400.tsv")
    p = sub.add_parser("report")
    p.add_argument("--runs", type=Path, default=ROOT / "runs/ft")
    p.add_argument("--out", type=Path, default=ROOT / "experiments/results/finetune_defaults")
    a = ap.parse_args()
    make_task(a.out) if a.cmd == "make-task" else report(a.runs, a.out)
