"""A supernet child's training step vs the same architecture as a standalone static model.

    python -m benchmarks.child_vs_static --config configs/tiny.yaml --steps 20 --rounds 3

The design goal: a child step should cost what the static model costs (no weight copies, no per-step
rebuilding, optimizer work only on parameters with gradients). Both train the same architectures
on the same batches with the same optimizer; rounds interleave them so machine drift hits both.
Writes benchmarks/results/child_vs_static.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from benchmarks.harness import command_line, describe, interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bar()
    from nasfast.config import load_config
    from nasfast.data.blocks import build_corpus
    from nasfast.space.checks import build_space
    from nasfast.space.supernet import StaticModel, Supernet
    from nasfast.training.optim import build_optimizer, clip_and_step

    cfg = load_config(args.config, args.set)
    space = build_space(cfg)
    corpus = build_corpus(cfg.data)
    torch.manual_seed(0)
    batch = corpus.collate(corpus.train_blocks[: cfg.train.batch_size])
    archs = {"largest": space.largest(), "random": space.random_arch(random.Random(1)), "mixed": space.random_arch(random.Random(2))}
    supernet = Supernet(cfg.model, space, corpus.vocab_size, cfg.kernels.backend)
    sup_opt = build_optimizer(supernet, cfg)
    sup_sched = torch.optim.lr_scheduler.LambdaLR(sup_opt, lambda s: 1.0)
    statics = {}
    for name, arch in archs.items():
        model = StaticModel(cfg.model, space, arch, corpus.vocab_size, cfg.kernels.backend)
        opt = build_optimizer(model, cfg)
        statics[name] = (model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))

    def supernet_step(arch):
        supernet(batch["input_ids"], batch["attention_mask"], arch, batch["labels"]).loss.backward()
        params = [p for p in supernet.child_parameters(arch) if p.grad is not None]
        clip_and_step(params, sup_opt, sup_sched, cfg.train.clip_norm)

    def static_step(name):
        model, opt, sched = statics[name]
        model(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
        clip_and_step(list(model.parameters()), opt, sched, cfg.train.clip_norm)

    fns = {}
    for name, arch in archs.items():
        fns[(name, "supernet")] = lambda arch=arch: supernet_step(arch)
        fns[(name, "static")] = lambda name=name: static_step(name)
    times = interleaved(fns, args.rounds, per_round=args.steps, warmup=1)

    rows = []
    for name, arch in archs.items():
        sup, sta = statistics.median(times[(name, "supernet")]), statistics.median(times[(name, "static")])
        rows.append({"child": name, "arch": space.arch_id(arch), "supernet_median_s": sup, "static_median_s": sta,
                     "ratio_supernet_over_static": sup / sta})
    result = {"command": command_line(), "machine": describe(), "backend": supernet.ops.name, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "child_vs_static.json").write_text(json.dumps(result, indent=2))
    m = result["machine"]
    lines = ["# Supernet child step vs the same architecture as a static model", "",
             f"Command: `{result['command']}`  ", f"Machine: {m['cpu_model']}, {m['logical_cpus']} cores, torch {m['torch']}"
             f" ({m['torch_threads']} threads); backend {result['backend']}; one batch of {cfg.train.batch_size} x {cfg.data.block_size}"
             " tokens; forward + backward + clipping + AdamW step.", "",
             "| child | arch | supernet step (s) | static step (s) | supernet / static |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['child']} | `{r['arch']}` | {r['supernet_median_s']:.3f} | {r['static_median_s']:.3f} | {r['ratio_supernet_over_static']:.2f} |"
              for r in rows]
    (out / "child_vs_static.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
