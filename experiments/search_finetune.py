"""Searched children vs a random child vs plain BERT, at an equal parameter budget and equal pretraining.

    OMP_NUM_THREADS=1 python -m experiments.search_finetune            # full run (hours on 2 busy cores)
    python -m experiments.search_finetune --quick                      # micro setting, a smoke test of the pipeline

Protocol (every stage is skipped when its output exists, so an interrupted run resumes):
1. two supernets on the same config and corpus, ``spos`` and ``magic`` (``nasfast pretrain``);
2. ``nasfast search`` on each under the parameter budget (evolution, plus random search with the same
   number of evaluations as the NAS baseline); the random child (c) is the first child random search
   draws (seed 0), a uniform draw among the children under the budget;
3. the four models are pretrained *from scratch as standalone models* with the supernet run's exact
   protocol (data, batches and masking per step, optimizer, schedule, steps; the ground-truth protocol
   of ``nasfast ground-truth``): (a) the magic-searched child, (b) the spos-searched child, (c) the
   random child, (d) ``transformers.BertForMaskedLM`` with the same hidden size and as many layers as
   fit in the budget. Every fine-tuned model has seen exactly ``train.steps`` pretraining steps; the
   supernets' steps only choose the architectures (the NAS literature's retrain-from-scratch protocol);
4. ``nasfast finetune`` of each on both embedded tasks with the same settings and seeds;
5. OUT/results.json and OUT/table.md, with every command and the machine description.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"magic-searched": "(a) searched child, magic supernet", "spos-searched": "(b) searched child, spos supernet",
          "random-child": "(c) random child under the budget", "bert": "(d) plain BERT (BertForMaskedLM)"}
TASKS = ("sentiment", "wic")
QUICK_OVERRIDES = [
    "model.hidden=32", "model.max_len=64", "space.layers=3", "space.candidates=[mha:2, ffn:64, conv:3, identity]",
    "data.max_chars_per_file=40000", "data.vocab_size=500", "data.block_size=64", "data.dev_blocks=32",
    "train.steps=30", "train.batch_size=8", "train.warmup_steps=3", "train.log_every=10", "train.eval_every=30",
    "train.eval_batches=2", "train.eval_random_children=1", "train.ckpt_every=30", "train.device=cpu",
    "kernels.backend=eager",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="run config of supernets and standalone models")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--max-params", type=int, help="parameter budget of (a)-(d) (default 1,490,000; --quick: 33,000)")
    p.add_argument("--bert-heads", type=int, default=2, help="BERT attention heads (head size 64 at H=128, BERT's)")
    p.add_argument("--bert-intermediate", type=int, help="BERT feed-forward size (default 4 x hidden)")
    p.add_argument("--bert-extra-lrs", type=float, nargs="*",
                   help="also pretrain BERT at these peak lrs, a sensitivity check beside (d), which uses the run's lr "
                        "(default 1e-3 5e-4; --quick: none)")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help="fine-tuning tasks (embedded names or TSV paths)")
    p.add_argument("--work", help="run folders (default /tmp/nasfast_sf, with --quick /tmp/nasfast_sf_quick)")
    p.add_argument("--out", help="results folder (default experiments/results/search_finetune; with --quick WORK/results)")
    p.add_argument("--quick", action="store_true", help="micro setting, tiny slices of the tasks: a ~5 minute smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.set = QUICK_OVERRIDES + args.set
        args.population, args.generations, args.seeds, args.epochs = 4, 2, [0, 1, 2], 1
    args.max_params = args.max_params or (33_000 if args.quick else 1_490_000)
    if args.bert_extra_lrs is None:
        args.bert_extra_lrs = [] if args.quick else [1e-3, 5e-4]
    args.work = Path(args.work or ("/tmp/nasfast_sf_quick" if args.quick else "/tmp/nasfast_sf"))
    args.out = Path(args.out or (args.work / "results" if args.quick else ROOT / "experiments" / "results" / "search_finetune"))
    return args


class Log:
    """Runs ``nasfast`` commands as subprocesses and records each (what the results README lists)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def nasfast(self, *argv: str) -> None:
        cmd = [sys.executable, "-m", "nasfast", *map(str, argv)]
        shown = "nasfast " + " ".join(shlex.quote(str(a)) for a in argv)
        self.commands.append(shown)
        print(f"$ {shown}", flush=True)
        started = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"  ({time.time() - started:.0f} s)", flush=True)

    def note(self, text: str) -> None:
        self.commands.append(text)
        print(text, flush=True)


# --- standalone pretraining (the ground-truth protocol, keeping the weights) --------------------------------
def bert_config(run, layers: int, heads: int, intermediate: int):
    from transformers import BertConfig

    m, tok = run.cfg.model, run.corpus.tokenizer
    return BertConfig(vocab_size=run.corpus.vocab_size, hidden_size=m.hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=m.max_len, type_vocab_size=2,
                      hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout, layer_norm_eps=m.layer_norm_eps,
                      initializer_range=m.init_std, pad_token_id=tok.pad_token_id)


def bert_params(run, layers: int, heads: int, intermediate: int) -> int:
    import torch
    from transformers import BertForMaskedLM

    with torch.device("meta"):
        model = BertForMaskedLM(bert_config(run, layers, heads, intermediate))
    return sum(p.numel() for p in model.parameters())  # the decoder is tied to the embedding: counted once


def pretrain_standalone(run, model, forward, steps: int, lr: float | None = None) -> dict:
    """``steps`` steps of the run's exact protocol (as ``nasfast ground-truth`` trains a child); ``lr``
    replaces the run's peak learning rate (everything else unchanged)."""
    import copy

    from nasfast.data.blocks import micro_batches
    from nasfast.space.evaluation import evaluate_mlm
    from nasfast.training.optim import build_optimizer, build_scheduler, clip_and_step

    cfg, device, corpus = copy.deepcopy(run.cfg), run.device, run.corpus
    if lr is not None:
        cfg.train.lr = lr
    t = cfg.train
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    started, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        loss_sum = 0.0
        for seed, batch in micro_batches(corpus, t, step, device):
            loss = forward(model, batch, seed)
            (loss / t.grad_accum).backward()
            loss_sum += float(loss.detach()) / t.grad_accum
        clip_and_step(list(model.parameters()), optimizer, scheduler, t.clip_norm)
        losses.append(loss_sum)
        if step % 100 == 0 or step == steps - 1:
            print(f"    step {step + 1}/{steps} loss {loss_sum:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    dev = evaluate_mlm(lambda i, m, l: forward(model, {"input_ids": i, "attention_mask": m, "labels": l}, None, full=True),
                       run.dev_batches(), device)
    return {"steps": steps, "lr": t.lr, "final_train_loss": losses[-1], "dev_mlm": dev, "train_time_s": time.perf_counter() - started}


@dataclass
class MLMScores:
    """What ``evaluate_mlm`` reads from a forward: the loss and the masked / correctly predicted counts."""

    loss: object
    num_masked: int
    num_correct: int


def static_forward(model, batch, seed, full=False):
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], layer_seed=seed)
    return out if full else out.loss


def bert_forward(model, batch, seed, full=False):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    if not full:
        return out.loss
    sel = batch["labels"] != -100
    return MLMScores(out.loss, int(sel.sum()), int((out.logits[sel].argmax(-1) == batch["labels"][sel]).sum()))


def build_model(name: str, run, arch, args, bert_layers: int, folder: Path, log: Log) -> None:
    """Pretrain model ``name`` standalone and save it as a transformers folder (skipped when present)."""
    import torch

    from nasfast.nas.export import prepare_tokenizer
    from nasfast.nas.hf_model import save_folder, to_masked_lm
    from nasfast.space.supernet import StaticModel

    steps = run.cfg.train.steps
    intermediate = args.bert_intermediate or 4 * run.cfg.model.hidden
    lr = extra_lr(name)
    describe = (f"BertForMaskedLM L={bert_layers} H={run.cfg.model.hidden} heads={args.bert_heads} ffn={intermediate}"
                if name.startswith("bert") else run.space.arch_id(arch))
    log.note(f"# (in this script) pretrain {name} from scratch: {describe}, {steps} steps, the protocol of {run.path}"
             f"{f' with peak lr {lr:g}' if lr else ''}; "
             f"saved as a transformers folder in {folder}")
    if (folder / "pretrain.json").is_file():
        return
    tokenizer = prepare_tokenizer(run.corpus.tokenizer, run.cfg.model.max_len)
    torch.manual_seed(run.cfg.train.seed)  # the same initialisation seed for every model, as in ground truth
    if name.startswith("bert"):
        from transformers import BertForMaskedLM

        model = BertForMaskedLM(bert_config(run, bert_layers, args.bert_heads, intermediate)).to(run.device)
        info = pretrain_standalone(run, model, bert_forward, steps, lr)
        _save_bert(model.cpu(), tokenizer, folder)
    else:
        model = StaticModel(run.cfg.model, run.space, arch, run.corpus.vocab_size, backend="eager").to(run.device)
        model.set_backend(run.cfg.kernels.backend, run.device)
        info = pretrain_standalone(run, model, static_forward, steps)
        hf = to_masked_lm(model.cpu(), run.corpus.tokenizer, "eager", nasfast_source={"weights": "standalone", "steps": steps})
        save_folder(hf, tokenizer, folder)
    params = sum(p.numel() for p in model.parameters())
    (folder / "pretrain.json").write_text(json.dumps({"model": name, "architecture": describe, "params": params, **info}, indent=2))


def extra_lr(name: str) -> float | None:
    return float(name.removeprefix("bert-lr")) if name.startswith("bert-lr") else None


def all_models(args) -> dict:
    """(a)-(d), then a BERT per extra pretraining lr (not part of the verdict: a sensitivity check)."""
    extra = {f"bert-lr{lr:g}": f"(d') plain BERT, pretraining lr {lr:g}" for lr in args.bert_extra_lrs}
    return {**MODELS, **extra}


def _save_bert(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


# --- the pipeline --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from benchmarks.harness import describe
    from nasfast.analysis.runs import open_run
    from nasfast.config import load_config, save_config

    started = time.time()
    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.set)
    config_path = work / "config.yaml"
    save_config(cfg, config_path)
    log = Log()

    # 1. supernets
    runs = {}
    for sampler in ("spos", "magic"):
        folder = work / "runs" / sampler
        summary = folder / "summary.json"
        if not (summary.is_file() and json.loads(summary.read_text())["status"] == "completed"):
            if (folder / "checkpoints" / "last.pt").is_file():
                log.nasfast("pretrain", "--out", folder, "--resume", "--no-progress")
            else:
                log.nasfast("pretrain", "--config", config_path, "--out", folder, "--sampler", sampler, "--no-progress")
        else:
            log.commands.append(f"nasfast pretrain --config {config_path} --out {folder} --sampler {sampler} --no-progress")
        runs[sampler] = open_run(folder)
    run = runs["spos"]  # the standalone protocol (identical train/data sections in both runs)

    # 2. budget, BERT depth and searches
    heads, inter = args.bert_heads, args.bert_intermediate or 4 * cfg.model.hidden
    bert_layers = max((L for L in range(1, 25) if bert_params(run, L, heads, inter) <= args.max_params), default=0)
    if bert_layers == 0:
        raise SystemExit(f"--max-params {args.max_params} is below a 1-layer BERT ({bert_params(run, 1, heads, inter):,})")
    searches = {}
    for sampler in ("spos", "magic"):
        for strategy in ("evolution", "random"):
            folder = work / "search" / f"{sampler}-{strategy}"
            log.nasfast("search", "--run", work / "runs" / sampler, "--max-params", args.max_params, "--strategy", strategy,
                        "--population", args.population, "--generations", args.generations, "--seed", args.search_seed,
                        "--out", folder, "--no-progress")
            searches[f"{sampler}-{strategy}"] = json.loads((folder / "search.json").read_text())
    archs = {"magic-searched": searches["magic-evolution"]["best"]["arch"], "spos-searched": searches["spos-evolution"]["best"]["arch"],
             "random-child": searches["spos-random"]["children"][0]["arch"]}

    # 3. standalone pretraining of (a)-(d), and the BERT lr check
    models = {}
    for name in all_models(args):
        folder = work / "models" / name
        build_model(name, run, run.space.parse(archs[name]) if name in archs else None, args, bert_layers, folder, log)
        models[name] = json.loads((folder / "pretrain.json").read_text())

    # 4. fine-tuning
    finetunes = {}
    for name in all_models(args):
        for task in args.tasks:
            folder = work / "finetune" / f"{name}-{Path(task).name}"
            ft = ["finetune", "--model", work / "models" / name, "--task", task, "--epochs", args.epochs, "--lr", args.lr,
                  "--batch-size", args.batch_size, "--max-len", args.max_len, "--seeds", *args.seeds, "--out", folder, "--no-progress"]
            if args.quick:  # tiny slices of the task files keep the smoke test short
                ft = _quick_task(ft, task, work)
            log.nasfast(*ft)
            finetunes[(name, task)] = json.loads((folder / "results.json").read_text())

    # 5. results
    report = collect(args, cfg, run, searches, archs, models, finetunes, bert_layers, log, describe(), time.time() - started)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table(report))
    (out / "README.md").write_text(readme(report, out / "notes.md"))
    for key in ("spos-evolution", "magic-evolution", "spos-random", "magic-random"):
        for ext in ("json", "png"):
            shutil.copy(work / "search" / key / f"search.{ext}", out / f"search_{key}.{ext}")
    print(table(report))
    return 0


def _quick_task(ft: list, task: str, work: Path) -> list:
    import gzip

    from nasfast.nas.finetune import TASKS

    if task not in TASKS:
        return ft
    folder = work / "task_slices"
    folder.mkdir(exist_ok=True)
    paths = {}
    for split, n in (("train", 400), ("dev", 100), ("test", 100)):
        src = ROOT / "nasfast" / "tasks" / f"{TASKS[task]}_{split}.tsv.gz"
        lines = gzip.decompress(src.read_bytes()).decode().splitlines()[: n + 1]
        paths[split] = folder / f"{task}_{split}.tsv"
        paths[split].write_text("\n".join(lines) + "\n")
    i = ft.index("--task")
    return ft[:i] + ["--task", paths["train"], "--dev", paths["dev"], "--test", paths["test"]] + ft[i + 2 :]


def collect(args, cfg, run, searches, archs, models, finetunes, bert_layers, log, machine, wall) -> dict:
    rows = []
    for name, label in all_models(args).items():
        row = {"model": name, "label": label, "architecture": models[name]["architecture"], "params": models[name]["params"],
               "pretrain_steps": models[name]["steps"], "pretrain_dev_mlm_loss": models[name]["dev_mlm"]["loss"],
               "pretrain_dev_mlm_accuracy": models[name]["dev_mlm"]["accuracy"], "pretrain_lr": models[name].get("lr", cfg.train.lr)}
        for task in args.tasks:
            ft = finetunes[(name, task)]
            t = Path(task).name
            row[f"{t}_dev"], row[f"{t}_test"] = ft["dev_accuracy"], ft["test_accuracy"]
            row[f"{t}_per_seed"] = [{"seed": s["seed"], "dev": s["dev_accuracy"], "test": s["test_accuracy"]} for s in ft["seeds"]]
            row[f"{t}_majority"] = ft["majority_baseline"]
        rows.append(row)
    search_summary = {k: {"best": v["best"], "evaluations": v["evaluations"]} for k, v in searches.items()}
    return {
        "kind": "search_finetune", "budget": {"max_params": args.max_params}, "bert_layers": bert_layers,
        "config": cfg.to_dict(), "finetune": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                              "max_len": args.max_len, "seeds": args.seeds, "tasks": args.tasks},
        "search": {"population": args.population, "generations": args.generations, "seed": args.search_seed, **search_summary},
        "archs": archs, "rows": rows, "commands": log.commands, "machine": machine, "wall_time_s": wall,
        "script": "python -m experiments.search_finetune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }


def _ms(d: dict) -> str:
    return f"{100 * d['mean']:.1f} ± {100 * d['sd']:.1f}"


def table(report: dict) -> str:
    tasks = [Path(t).name for t in report["finetune"]["tasks"]]
    head = "| model | architecture | params | pretrain dev MLM loss | " + " | ".join(f"{t} dev | {t} test" for t in tasks) + " |"
    lines = [head, "|" + " --- |" * (4 + 2 * len(tasks))]
    for r in report["rows"]:
        cells = [r["label"], f"`{r['architecture']}`", f"{r['params']:,}", f"{r['pretrain_dev_mlm_loss']:.3f}"]
        cells += [x for t in tasks for x in (_ms(r[f"{t}_dev"]), _ms(r[f"{t}_test"]))]
        lines.append("| " + " | ".join(cells) + " |")
    maj = report["rows"][0]
    lines.append("")
    lines.append("Accuracy in %, mean ± sd over fine-tuning seeds " + ", ".join(map(str, report["finetune"]["seeds"])) +
                 "; majority-label baseline (test): " + ", ".join(f"{t} {100 * maj[f'{t}_majority']['test']:.1f}" for t in tasks) + ".")
    s = report["search"]
    lines.append("")
    lines.append("| search | best inherited-weight dev MLM loss | params | evaluations |")
    lines.append("| --- | --- | --- | --- |")
    for key in ("magic-evolution", "magic-random", "spos-evolution", "spos-random"):
        b = s[key]["best"]
        lines.append(f"| {key} | {b['loss']:.4f} | {b['params']:,} | {s[key]['evaluations']['total']} |")
    return "\n".join(lines) + "\n"


def verdict(report: dict) -> list:
    """Per task: the best model by mean test accuracy, its margin over the runner-up and the seed spread."""
    lines = []
    for task in (Path(t).name for t in report["finetune"]["tasks"]):
        ranked = sorted((r for r in report["rows"] if r["model"] in MODELS), key=lambda r: -r[f"{task}_test"]["mean"])
        first, second = ranked[0], ranked[1]
        margin = 100 * (first[f"{task}_test"]["mean"] - second[f"{task}_test"]["mean"])
        spread = 100 * max(first[f"{task}_test"]["sd"], second[f"{task}_test"]["sd"])
        where = "within" if margin <= spread else "beyond"
        lines.append(f"- {task}: {first['label']} has the best mean test accuracy, {100 * first[f'{task}_test']['mean']:.1f}%, "
                     f"{margin:.1f} points above {second['label']} ({100 * second[f'{task}_test']['mean']:.1f}%); the larger "
                     f"seed sd of the two is {spread:.1f} points, so the margin is {where} the seed spread. Order: "
                     + " > ".join(r["model"] for r in ranked) + ".")
        berts = [r for r in report["rows"] if r["model"].startswith("bert")]
        if len(berts) > 1:
            best = max(berts, key=lambda r: r[f"{task}_test"]["mean"])
            lrs = ", ".join(f"{r['pretrain_lr']:g}" for r in berts)
            lines.append(f"  BERT over pretraining lrs {lrs}: best {task} test "
                         f"{_ms(best[f'{task}_test'])} at lr {best['pretrain_lr']:g}.")
    return lines


def readme(report: dict, notes_file: Path | None = None) -> str:
    """The results README; a hand-written ``notes.md`` beside it (interpretation) is included verbatim."""
    m, ft = report["machine"], report["finetune"]
    notes = [notes_file.read_text().rstrip(), ""] if notes_file is not None and notes_file.is_file() else []
    cfg = report["config"]
    parts = [
        "# Searched child vs random child vs plain BERT at one budget (generated by experiments/search_finetune.py)",
        "",
        f"Budget: {report['budget']['max_params']:,} parameters. Pretraining: every model trained from scratch as a standalone model "
        f"for {cfg['train']['steps']} steps of {cfg['train']['batch_size']} x {cfg['data']['block_size']} tokens on the same corpus, "
        "batches and masks (the supernet run's protocol). Fine-tuning: "
        f"{ft['epochs']:g} epochs, lr {ft['lr']:g}, batch {ft['batch_size']}, max length {ft['max_len']}, seeds {', '.join(map(str, ft['seeds']))}; "
        "best epoch on dev; test accuracy of that epoch.",
        "",
        table(report),
        "Automatic reading of the table:",
        "",
        *verdict(report),
        "",
        *notes,
        "## Commands",
        "",
        "The whole experiment (each stage is skipped when its output exists):",
        "",
        f"    OMP_NUM_THREADS=1 {report['script']}",
        "",
        "which ran these commands and steps, in order:",
        "",
        *[f"    {c}" for c in report["commands"]],
        "",
        f"## Machine\n\n{m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['torch_threads']} threads, "
        f"OMP_NUM_THREADS={m['omp_num_threads']}), transformers {m['transformers']}; load average at the end "
        f"{m['load_average_1_5_15min']} (a shared machine: wall times are not comparable). Total wall time of this invocation "
        f"{report['wall_time_s'] / 60:.0f} min.",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
