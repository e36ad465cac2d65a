"""Inherited-weight estimates: each child's dev MLM loss/accuracy with the supernet's weights."""
from __future__ import annotations

from tqdm.auto import tqdm

from nasfast.analysis.runs import Run, dev_description
from nasfast.space.evaluation import evaluate_child
from nasfast.space.searchspace import Arch
from nasfast.space.supernet import child_num_params


def inherited_estimates(run: Run, archs: list[Arch], dev_batches: int | None = None, progress: bool = True) -> dict:
    model = run.supernet()
    dev = run.dev_batches(dev_batches)
    vocab, max_len = run.corpus.vocab_size, run.cfg.model.max_len
    results = []
    for arch in tqdm(archs, desc="evaluate", unit="child", disable=not progress, dynamic_ncols=True):
        scores = evaluate_child(model, arch, dev, run.device)
        results.append({"arch": run.space.arch_id(arch), **scores, "params": child_num_params(run.space, arch, vocab, max_len)})
    return {"kind": "estimates", "run": str(run.path), "sampler": run.cfg.sampler.name, "seed": run.cfg.train.seed,
            "dev": dev_description(run, dev), "results": results}
