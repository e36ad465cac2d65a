"""Ground truth for rank correlation (docs/protocols.md §5): each child trained from scratch, standalone.

Every child gets the same protocol: the run's config (model, train section), the run's data folder
(identical tokenizer and blocks), the same number of steps, and the trainer's per-step data order
and seeding (batch of step s = f(seed, s); masking from ``micro_seed(seed, step, micro)``). It is
then scored by dev MLM loss and accuracy on the fixed dev batches.

Results are cached one JSON per child in OUT/cache/<sha1 of arch id>.json, written atomically, so
an interrupted run resumes where it stopped and a rerun recomputes nothing. OUT/protocol.json pins
the protocol: a different one (steps, config, data) in the same OUT is refused, never mixed.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from nasfast import rng
from nasfast.analysis.runs import Run, dev_description
from nasfast.data.blocks import data_fingerprint
from nasfast.errors import UserError
from nasfast.files import atomic_write_text
from nasfast.space.evaluation import evaluate_mlm
from nasfast.space.searchspace import Arch
from nasfast.space.supernet import StaticModel, child_num_params

PROTOCOL_VERSION = 1
# Train keys that do not change what a child learns (logging, supernet evaluation, device).
NOT_PROTOCOL = ("device", "log_every", "eval_every", "eval_batches", "eval_random_children", "ckpt_every",
               "deepspeed")  # how a run is executed, not what the ground truth measures


def cache_path(out: Path, arch_id: str) -> Path:
    return out / "cache" / f"{hashlib.sha1(arch_id.encode()).hexdigest()}.json"


def protocol(run: Run, steps: int, dev: list[dict]) -> dict:
    from nasfast.training.optim import warmup_steps

    train = {k: v for k, v in asdict(run.cfg.train).items() if k not in NOT_PROTOCOL}
    train["steps"] = steps
    train["warmup_steps"] = warmup_steps(run.cfg.train, steps, notice=False)  # what the child trains with
    return {
        "version": PROTOCOL_VERSION,
        "model": asdict(run.cfg.model),
        "train": train,
        "data_sha1": data_fingerprint(run.path / "data"),
        "dev": dev_description(run, dev),
    }


def protocol_key(proto: dict) -> str:
    return hashlib.sha1(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:16]


def train_child(run: Run, arch: Arch, steps: int, dev: list[dict]) -> dict:
    """Train ``arch`` from scratch as a StaticModel for ``steps`` steps; its dev loss/accuracy."""
    from nasfast.data.blocks import micro_batches
    from nasfast.training.optim import build_optimizer, build_scheduler, clip_and_step

    cfg, t, device, corpus = run.cfg, run.cfg.train, run.device, run.corpus
    with rng.isolated("cpu"):  # the same initialisation seed for every child; the caller's RNG is kept
        rng.seed_global(t.seed)
        model = StaticModel(cfg.model, run.space, arch, corpus.vocab_size, backend="eager")
    model = model.to(device)
    model.set_backend(cfg.kernels.backend, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    started, train_loss = time.perf_counter(), math.nan
    model.train()
    for step in range(steps):
        train_loss = 0.0
        for seed, batch in micro_batches(corpus, t, step, device):  # the trainer's exact batches
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16):
                loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], layer_seed=seed).loss
            (loss / t.grad_accum).backward()
            train_loss += float(loss.detach()) / t.grad_accum
        clip_and_step(list(model.parameters()), optimizer, scheduler, t.clip_norm)
        if not math.isfinite(train_loss):
            break
    model.eval()
    scores = evaluate_mlm(lambda i, m, l: model(i, m, l), dev, device)
    return {
        **scores,
        "params": child_num_params(run.space, arch, corpus.vocab_size, cfg.model.max_len),
        "final_train_loss": train_loss,
        "diverged": not (math.isfinite(train_loss) and math.isfinite(scores["loss"])),
        "train_time_s": time.perf_counter() - started,
    }


def _pin_protocol(out: Path, proto: dict) -> str:
    path = out / "protocol.json"
    if path.is_file():
        from nasfast.filevalues import load_json

        saved = load_json(path, "ground-truth protocol")
        if saved != proto:
            changed = sorted(k for k in set(saved) | set(proto) if saved.get(k) != proto.get(k))
            raise UserError(f"{out} holds ground truth for a different protocol (differs in: {', '.join(changed)}); use another --out")
    else:
        atomic_write_text(path, json.dumps(proto, indent=2))
    return protocol_key(proto)


def read_cached(out: Path, arch_id: str, key: str) -> Optional[dict]:
    path = cache_path(out, arch_id)
    if not path.is_file():
        return None
    from nasfast import filevalues as fv

    record = fv.load_cache_entry(path)
    if record.get("arch") != arch_id or record.get("protocol") != key:
        raise UserError(f"cache entry {path} is for another arch or protocol; remove it or use another --out")
    fv.scores(path, record, ("loss", "accuracy"))  # NaN is kept: a diverged child is recorded as one
    fv.boolean(path, "diverged", record.get("diverged"))
    fv.integer(path, "params", record.get("params"), lo=0)
    return record


def _child_line(done: int, total: int, record: dict, elapsed_s: float, trained: int, left: int) -> str:
    """``ground truth 3/24: ARCH loss 5.123 acc 0.201 (41 s); ETA 14 min`` (ETA from this call's mean)."""
    eta_s = elapsed_s / trained * left
    eta = f"{eta_s / 60:.0f} min" if eta_s >= 90 else f"{eta_s:.0f} s"
    status = " DIVERGED" if record["diverged"] else ""
    return (f"ground truth {done}/{total}: {record['arch']} loss {record['loss']:.3f} acc {record['accuracy']:.3f}"
            f"{status} ({record['train_time_s']:.0f} s); ETA {eta if left else 'done'}")


def _check_memory(run: Run, archs: list[Arch]) -> None:
    """Refuse (one line) before training any child if the costliest child's step cannot fit."""
    from nasfast.training.memory import check_step_fits, step_memory

    if archs:
        worst = max(archs, key=lambda a: step_memory(run.cfg, run.space, run.corpus.vocab_size, False, False, a).total)
        check_step_fits(run.cfg, run.space, run.corpus.vocab_size, run.device,
                        f"training child {run.space.arch_id(worst)}", arch=worst)


def run_ground_truth(
    run: Run, archs: list[Arch], out: Path, steps: Optional[int] = None, dev_batches: Optional[int] = None,
    limit: Optional[int] = None, progress: bool = True, on_trained: Optional[Callable[[str, dict], None]] = None,
) -> dict:
    """Train every uncached child (at most ``limit`` this call); write OUT/ground_truth.json.

    Returns ``{"results", "computed", "cached", "remaining", ...}`` (lists of arch ids). ``on_trained``
    is called after each child's cache entry is written.
    """
    steps = run.cfg.train.steps if steps is None else steps
    if steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be >= 0, got {limit}")
    out = Path(out)
    dev = run.dev_batches(dev_batches)
    proto = protocol(run, steps, dev)
    key = _pin_protocol(out, proto)
    ids = [run.space.arch_id(a) for a in archs]
    records = {i: r for i in ids if (r := read_cached(out, i, key)) is not None}
    cached = list(records)
    computed: list[str] = []
    todo = [(a, i) for a, i in zip(archs, ids) if i not in records]
    if limit is not None:
        todo = todo[:limit]
    _check_memory(run, [a for a, _ in todo])
    with tqdm(total=len(ids), initial=len(cached), desc="ground truth", unit="child", disable=not progress, dynamic_ncols=True) as bar:
        started = time.perf_counter()
        for n, (arch, arch_id) in enumerate(todo, 1):
            bar.set_postfix_str(arch_id)
            record = {"arch": arch_id, "protocol": key, "steps": steps, **train_child(run, arch, steps, dev)}
            atomic_write_text(cache_path(out, arch_id), json.dumps(record, indent=2))
            records[arch_id] = record
            computed.append(arch_id)
            bar.update(1)
            # one line per child, also with --no-progress (logs of long jobs): hours of work need an ETA
            tqdm.write(_child_line(len(records), len(ids), record, time.perf_counter() - started, n, len(todo) - n))
            sys.stdout.flush()  # seen as it happens when stdout is a log file
            if on_trained is not None:
                on_trained(arch_id, record)
    results = [records[i] for i in ids if i in records and not records[i]["diverged"]]
    summary = {
        "kind": "ground_truth",
        "run": str(run.path),
        "protocol": proto,
        "dev": proto["dev"],
        "complete": len(records) == len(ids),
        "results": results,
        "diverged": [i for i in ids if i in records and records[i]["diverged"]],
    }
    atomic_write_text(out / "ground_truth.json", json.dumps(summary, indent=2))
    return {**summary, "computed": computed, "cached": cached, "remaining": [i for i in ids if i not in records]}
