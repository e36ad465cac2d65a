"""From supernet to a fine-tuned model: ``nasfast search``, ``nasfast export``, ``nasfast finetune``.

Every handler checks its input before any heavy work and raises UserError (one line, exit 2).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from nasfast.cli.common import command, quiet_libraries
from nasfast.errors import UserError, warn

_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def count(text: str) -> int:
    """A positive count: ``1490000``, ``1.49e6``, ``1.49M``, ``500k``, ``2G``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgb]?)\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a count like 1490000, 1.49e6 or 1.49M, got '{text}'")
    return int(round(float(m.group(1)) * _SUFFIX.get(m.group(2), 1)))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to the ``nasfast`` parser."""
    from nasfast.nas.finetune import DEFAULT_LR, DEFAULT_STEPS
    from nasfast.nas.search import STRATEGIES

    p = sub.add_parser("search", help="evolutionary (or random) architecture search under a params/FLOPs budget",
                       description="Search the run's space for the child with the lowest inherited-weight dev MLM loss "
                                   "under a budget. Scores are cached by arch id in OUT/cache: an interrupted search "
                                   "resumes and a rerun evaluates nothing.")
    p.add_argument("--run", required=True, help="run folder (config.yaml, data/, checkpoints/last.pt)")
    p.add_argument("--max-params", type=count, metavar="N", help="parameter budget (exact count of the static child)")
    p.add_argument("--max-flops", type=count, metavar="N", help="FLOPs budget per sequence of data.block_size tokens")
    p.add_argument("--strategy", default="evolution", choices=STRATEGIES, help="evolution (default) or random (the baseline; same number of evaluations)")
    p.add_argument("--population", type=int, default=16, help="children per generation (default 16)")
    p.add_argument("--generations", type=int, default=6, help="generations, the random first one included (default 6)")
    p.add_argument("--parents", type=int, help="best children so far that breed the next generation (default population/2)")
    p.add_argument("--mutation-prob", type=float, default=0.5,
                   help="probability a crossover offspring also gets a single-operator mutation (a non-crossover one always does; default 0.5)")
    p.add_argument("--crossover", type=float, default=0.5, help="probability an offspring is a per-layer crossover of two parents (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--top-k", type=int, default=5, help="children listed under 'top' in search.json (default 5)")
    p.add_argument("--dev-batches", type=int, help="dev batches to score on (default: every dev block)")
    p.add_argument("--out", help="output folder (default RUN/search-STRATEGY)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("export", help="one child as a Hugging Face model folder (config.json, model.safetensors, tokenizer)",
                       description="Export a child of the run's supernet, with its inherited weights, as a transformers "
                                   "model folder; after `import nasfast` it loads with AutoModelForMaskedLM / "
                                   "AutoModelForSequenceClassification / AutoTokenizer.from_pretrained.")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--arch", required=True,
                   help="arch string ('mha:4|ffn:512|...'), an arch list file (its first child) or a search.json (its best child)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier export, which is replaced)")
    p.add_argument("--backend", default="eager", choices=("eager", "native", "triton", "auto"),
                   help="fused-op backend stored in config.json (default eager: runs anywhere)")

    p = sub.add_parser("finetune", help="fine-tune a model folder on a classification task, several seeds",
                       description="Fine-tune an exported nasfast model (or any local BERT-style transformers folder) on "
                                   "the embedded tasks or a TSV with a header: label + sentence, or label + sentence1 + "
                                   "sentence2 (other columns ignored). A step budget (or --epochs), the best dev evaluation "
                                   "kept; dev and test accuracy per seed, and a warning when a seed does not beat the "
                                   "majority label on dev.")
    p.add_argument("--model", required=True, help="local model folder (config.json, weights, tokenizer)")
    p.add_argument("--task", required=True, help="sentiment, wic, or PATH.tsv[.gz] (train split of a user task)")
    p.add_argument("--dev", help="dev TSV of a user task (default: a seeded split of --task)")
    p.add_argument("--test", help="test TSV of a user task (default: a seeded split of --task)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/10/10 split when --dev/--test are not given")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help=f"optimizer steps, whatever the task size (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=float, help="train for E epochs instead of a step budget, dev evaluation after each")
    p.add_argument("--evals", type=int, default=10, help="dev evaluations of a step budget, evenly spaced (default 10)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help=f"peak learning rate (linear warm-up 10%%, then linear decay; default {DEFAULT_LR:g})")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per example after truncation (default 128)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (default 0 1 2)")
    p.add_argument("--out", required=True, help="output folder: results.json, labels.json, model/ (best dev seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("search")
def cmd_search(args: argparse.Namespace) -> int:
    from nasfast.analysis.runs import open_run
    from nasfast.nas.search import Budget, SearchSettings, search_run

    budget = Budget(args.max_params, args.max_flops)
    settings = SearchSettings(args.strategy, args.population, args.generations, args.parents, args.mutation_prob,
                              args.crossover, args.seed, args.top_k)
    run = open_run(args.run)
    quiet_libraries()
    out = Path(args.out) if args.out else run.path / f"search-{args.strategy}"
    res = search_run(run, budget, settings, out, args.dev_batches, progress=not args.no_progress)
    ev = res["evaluations"]
    print(f"{ev['total']} children ({ev['computed']} evaluated, {ev['cached']} cached)"
          f"{', space exhausted under the budget' if ev['exhausted'] else ''} -> {out / 'search.json'}, search.png")
    for r in res["top"]:
        print(f"  loss {r['loss']:.4f}  acc {r['accuracy']:.3f}  params {r['params']:>10,}  flops {r['flops']:>13,}  gen {r['generation']}  {r['arch']}")
    return 0


@command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from nasfast.analysis.runs import open_run
    from nasfast.nas.export import export_child, resolve_arch

    run = open_run(args.run)
    arch = resolve_arch(run.space, args.arch)
    quiet_libraries()
    out = export_child(run, arch, Path(args.out), args.backend)
    print(f"{run.space.arch_id(arch)} (inherited weights, backend {args.backend}) -> {out}")
    return 0


@command("finetune")
def cmd_finetune(args: argparse.Namespace) -> int:
    from nasfast.nas.finetune import DEFAULT_STEPS, FinetuneSettings, finetune, load_task

    steps = None if args.epochs is not None else (args.steps if args.steps is not None else DEFAULT_STEPS)
    settings = FinetuneSettings(steps=steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                max_len=args.max_len, seeds=list(args.seeds), evals=args.evals)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir} is not a local model folder (no config.json)")
    task = load_task(args.task, args.dev, args.test, args.split_seed)
    quiet_libraries()
    res = finetune(model_dir, task, settings, Path(args.out), progress=not args.no_progress)
    for r in res["seeds"]:
        where = f"best at step {r['best_step']}/{r['steps']}, epoch {r['best_epoch']:.2f}" if r["evals"] else "no dev evaluation"
        print(f"  seed {r['seed']}: dev {r['dev_accuracy']:.4f}  test {r['test_accuracy']:.4f}  ({where})")
    d, t, m = res["dev_accuracy"], res["test_accuracy"], res["majority_baseline"]
    print(f"{task.name}: dev {d['mean']:.4f} ± {d['sd']:.4f}  test {t['mean']:.4f} ± {t['sd']:.4f} "
          f"over {len(res['seeds'])} seeds (majority label: test {m['test']:.4f}) -> {Path(args.out) / 'results.json'}")
    if res["majority_warning"]:
        warn(res["majority_warning"])
    return 0

