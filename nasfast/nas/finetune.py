"""``nasfast finetune``: sequence classification on the embedded tasks or a user TSV, several seeds.

Tasks
- ``sentiment``: ``nasfast/tasks/mr_sentiment_{train,dev,test}.tsv.gz`` (label, sentence);
- ``wic``: ``nasfast/tasks/wic_wordnet_{train,dev,test}.tsv.gz`` (lemma, pos, sentence1, sentence2, label);
- any TSV (optionally gzipped) with a header: ``label`` and ``sentence`` (single sentence) or ``label``,
  ``sentence1``, ``sentence2`` (pair), detected from the columns; other columns are ignored. Dev and test
  come from ``--dev`` / ``--test`` or an 80/10/10 split of the file seeded by ``--split-seed``.
Labels may be any strings; they are mapped to ids in sorted order (numerically when all are integers),
and the mapping is saved (``labels.json`` and the model's ``id2label``).

Training is transformers' ``Trainer``: AdamW, linear warm-up (10%) and decay, periodic evaluation on dev,
and the best evaluation by dev accuracy restored at the end (early selection on dev). Test accuracy is
measured once, on that checkpoint. The default length is a step budget (``--steps``, evaluated on dev
``--evals`` times), not an epoch count: a few epochs of a 2k-example task are ~150 optimizer steps, too
few for a small model to leave the majority-label answer; ``--epochs`` trains (and evaluates) by epoch
instead. When the best dev accuracy of a seed is no better than always answering one label, the seed
record (``beats_majority``) and ``results.json`` (``majority_warning``) say so and the command prints a
warning. Each seed's result is cached in ``OUT/seeds/``, so an interrupted run resumes at the next seed;
``OUT/model/`` holds the fine-tuned model of the seed with the best dev accuracy.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

from nasfast.errors import UserError
from nasfast.files import atomic_write_text, writing
from nasfast.filevalues import boolean, load_cache_entry, number
from nasfast.nas.trainer_output import one_line_per_evaluation

TASKS = {"sentiment": "mr_sentiment", "wic": "wic_wordnet"}
SPLIT = (0.8, 0.1, 0.1)
CACHE_VERSION = 2  # 2: step budget, evaluation steps in the seed records


@dataclass
class Split:
    path: str
    texts: list  # list of (sentence,) or (sentence1, sentence2)
    labels: list  # label strings


@dataclass
class Task:
    name: str
    kind: str  # "single" or "pair"
    label_names: list  # id -> label string
    train: Split
    dev: Split
    test: Split

    def label_ids(self, split: Split) -> list:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in split.labels]

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for split in (self.train, self.dev, self.test):
            h.update(json.dumps([split.texts, split.labels]).encode())
        return h.hexdigest()


# --- reading and checking task files -----------------------------------------------------------------
def read_tsv(path: Path) -> tuple:
    """(columns, rows, kind) of a TSV with a header; every problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    text = text.lstrip("\ufeff")
    lines = [l for l in text.splitlines() if l.strip()]
    if not lines:
        raise UserError(f"{path} is empty")
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [c.strip() for c in next(reader)]
    if "label" not in header:
        raise UserError(f"{path}: no 'label' column (columns: {', '.join(header)})")
    if "sentence1" in header and "sentence2" in header:
        kind, text_cols = "pair", ("sentence1", "sentence2")
    elif "sentence" in header:
        kind, text_cols = "single", ("sentence",)
    else:
        raise UserError(f"{path}: needs a 'sentence' column, or 'sentence1' and 'sentence2' (columns: {', '.join(header)})")
    cols = [header.index(c) for c in text_cols]
    label_col = header.index("label")
    texts, labels = [], []
    for lineno, row in enumerate(reader, 2):
        if len(row) != len(header):
            raise UserError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
        label = row[label_col].strip()
        if not label:
            raise UserError(f"{path}:{lineno}: empty label")
        texts.append(tuple(row[c] for c in cols))
        labels.append(label)
    if not labels:
        raise UserError(f"{path} has a header but no examples")
    return kind, texts, labels


def _sorted_labels(labels: list) -> list:
    names = sorted(set(labels))
    try:
        return sorted(names, key=int)
    except ValueError:
        return names


def _embedded(name: str, split: str) -> Path:
    return Path(str(resources.files("nasfast") / "tasks" / f"{TASKS[name]}_{split}.tsv.gz"))


def load_task(task: str, dev: Optional[str] = None, test: Optional[str] = None, split_seed: int = 0) -> Task:
    """The embedded task ``sentiment`` / ``wic``, or a user TSV (with optional dev/test files)."""
    if task in TASKS:
        if dev or test:
            raise UserError(f"--dev/--test are for a user TSV; the embedded task '{task}' has its own splits")
        paths = {s: _embedded(task, s) for s in ("train", "dev", "test")}
        name = task
    else:
        if not task.endswith((".tsv", ".tsv.gz")) and not Path(task).is_file():
            raise UserError(f"--task must be {' or '.join(TASKS)}, or a .tsv file; got '{task}'")
        paths = {"train": Path(task), "dev": Path(dev) if dev else None, "test": Path(test) if test else None}
        name = Path(task).name.removesuffix(".gz").removesuffix(".tsv")
    kind, texts, labels = read_tsv(paths["train"])
    splits = {"train": Split(str(paths["train"]), texts, labels)}
    for s in ("dev", "test"):
        if paths[s] is not None:
            k, t, l = read_tsv(paths[s])
            if k != kind:
                raise UserError(f"{paths[s]} is a {k}-sentence task, {paths['train']} a {kind}-sentence one")
            splits[s] = Split(str(paths[s]), t, l)
    missing = [s for s in ("dev", "test") if s not in splits]
    if missing:
        splits.update(_seeded_split(splits["train"], missing, split_seed))
    names = _sorted_labels(splits["train"].labels)
    if len(names) < 2:
        raise UserError(f"{paths['train']}: the training examples have a single label '{names[0]}'; need at least two")
    known = set(names)
    for s in ("dev", "test"):
        unknown = sorted(set(splits[s].labels) - known)
        if unknown:
            raise UserError(f"{splits[s].path}: label '{unknown[0]}' does not occur in the training examples ({', '.join(names)})")
    return Task(name, kind, names, splits["train"], splits["dev"], splits["test"])


def _seeded_split(train: Split, missing: list, seed: int) -> dict:
    """Carve the missing dev/test splits out of the training file (10% each), seeded."""
    n = len(train.labels)
    need = len(missing) + 1
    if n < 10 * need:
        raise UserError(f"{train.path} has {n} examples: too few to split off {' and '.join(missing)} (give --dev/--test)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    size = int(round(n * SPLIT[1]))
    out, start = {}, 0
    for s in missing:
        idx = sorted(order[start : start + size])
        out[s] = Split(f"{train.path} [{s}: seeded split {seed}]", [train.texts[i] for i in idx], [train.labels[i] for i in idx])
        start += size
    keep = sorted(order[start:])
    train.texts[:], train.labels[:] = [train.texts[i] for i in keep], [train.labels[i] for i in keep]
    train.path = f"{train.path} [train: seeded split {seed}]"
    return out


# --- fine-tuning ------------------------------------------------------------------------------------------
# Measured in experiments/results/finetune_defaults/: 3 epochs at 1e-4 left a child of a 300-step tiny
# supernet at the majority label on a 2.4k-row task; these defaults learn there and on the embedded tasks.
DEFAULT_STEPS = 600
DEFAULT_LR = 1e-3


@dataclass
class FinetuneSettings:
    steps: Optional[int] = DEFAULT_STEPS  # optimizer steps; None when training by --epochs
    epochs: Optional[float] = None
    lr: float = DEFAULT_LR
    batch_size: int = 32
    max_len: int = 128
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    evals: int = 10  # dev evaluations of a step budget, evenly spaced (by --epochs: one per epoch)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        checks = [((self.steps is None) != (self.epochs is None), "give one of --steps and --epochs"),
                  (self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}"),
                  (self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
                  (self.evals > 0, f"--evals must be positive, got {self.evals}"),
                  (self.lr > 0, f"--lr must be positive, got {self.lr}"),
                  (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
                  (self.max_len >= 8, f"--max-len must be >= 8, got {self.max_len}"),
                  (self.batch_size <= 1 << 16, f"--batch-size {self.batch_size:,} is more than the limit 65,536 (a typo?)"),
                  (self.max_len <= 1 << 16, f"--max-len {self.max_len:,} is more than the limit 65,536 (a typo?)"),
                  (len(self.seeds) > 0, "--seeds needs at least one seed"),
                  (len(set(self.seeds)) == len(self.seeds), f"--seeds has duplicates: {self.seeds}")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int
    eval_every: Optional[int]  # steps between dev evaluations; None: after every epoch


def schedule(settings: FinetuneSettings, n_train: int) -> Schedule:
    """Optimizer steps, warm-up and dev-evaluation cadence for ``n_train`` training examples."""
    per_epoch = math.ceil(n_train / settings.batch_size)
    total = settings.steps if settings.steps is not None else math.ceil(per_epoch * settings.epochs)
    # An int: transformers 5 reads a float < 1 as a ratio, 4.x only takes steps.
    warmup = math.ceil(settings.warmup_ratio * total)
    every = None if settings.steps is None else max(1, math.ceil(total / settings.evals))
    return Schedule(total, warmup, every)


def _folder_sha1(folder: Path) -> str:
    """Content hash of a model folder's config and weight files (what a cached seed result depends on)."""
    h = hashlib.sha1()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix in (".safetensors", ".bin")):
            h.update(path.name.encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _encode(tokenizer, task: Task, split: Split, max_len: int):
    from datasets import Dataset

    if task.kind == "pair":
        enc = tokenizer([t[0] for t in split.texts], [t[1] for t in split.texts], truncation=True, max_length=max_len)
    else:
        enc = tokenizer([t[0] for t in split.texts], truncation=True, max_length=max_len)
    return Dataset.from_dict({**{k: list(v) for k, v in enc.items()}, "labels": task.label_ids(split)})


def _mean_sd(values: list) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _load_model_and_tokenizer(model_dir: Path, task: Task):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load a model and tokenizer from {model_dir}: {str(exc).splitlines()[0]}") from None
    id2label = dict(enumerate(task.label_names))
    load = lambda: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
        str(model_dir), num_labels=len(task.label_names), id2label=id2label,
        label2id={v: k for k, v in id2label.items()}, local_files_only=True)
    return tokenizer, config, load


def finetune(model_dir: Path, task: Task, settings: FinetuneSettings, out: Path, progress: bool = True) -> dict:
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    transformers.logging.set_verbosity_error()  # the load report of a new classification head is expected
    model_dir, out = Path(model_dir), Path(out)
    tokenizer, config, load_model = _load_model_and_tokenizer(model_dir, task)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and settings.max_len > positions:
        raise UserError(f"--max-len {settings.max_len} exceeds the model's {positions} position embeddings")
    protocol = {"version": CACHE_VERSION, "model": str(model_dir.resolve()), "model_sha1": _folder_sha1(model_dir),
                "task": task.name, "task_sha1": task.fingerprint(), "labels": task.label_names,
                "settings": {k: v for k, v in asdict(settings).items() if k != "seeds"}, "transformers": transformers.__version__}
    key = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]
    data = {s: _encode(tokenizer, task, getattr(task, s), settings.max_len) for s in ("train", "dev", "test")}
    collator = DataCollatorWithPadding(tokenizer)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "labels.json", json.dumps({"id2label": task.label_names, "task": task.name}, indent=2))

    def accuracy(pred) -> dict:
        import numpy as np

        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    import torch

    plan = schedule(settings, len(data["train"]))
    if plan.eval_every is None:
        length = dict(num_train_epochs=settings.epochs, eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch")
    else:  # save at every evaluation: the best one is restored at the end
        length = dict(max_steps=plan.total_steps, eval_strategy="steps", eval_steps=plan.eval_every, save_strategy="steps",
                      save_steps=plan.eval_every, logging_strategy="steps", logging_steps=plan.eval_every)
    majority = _majority(task)
    results = []
    for seed in settings.seeds:
        cached = out / "seeds" / f"seed{seed}.json"
        if cached.is_file():
            record = load_cache_entry(cached)  # a damaged or hand-edited entry: one line with the cure
            if record.get("protocol") != key:
                raise UserError(f"{out} holds results of another model, task or settings; use another --out")
            for name in ("dev_accuracy", "test_accuracy"):
                number(cached, name, record.get(name), 0.0, 1.0)
            boolean(cached, "beats_majority", record.get("beats_majority"))
            results.append(record)
            continue
        work = out / ".work" / f"seed{seed}"
        shutil.rmtree(work, ignore_errors=True)
        transformers.set_seed(seed)  # the new head's initialisation, dropout, data order
        model = load_model()
        args = TrainingArguments(
            output_dir=str(work), **length, learning_rate=settings.lr,
            per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=max(64, settings.batch_size),
            warmup_steps=plan.warmup_steps, weight_decay=settings.weight_decay, lr_scheduler_type="linear", save_only_model=True,
            save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="accuracy", greater_is_better=True,
            seed=seed, data_seed=seed, report_to="none", disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["dev"],
                          data_collator=collator, compute_metrics=accuracy)
        one_line_per_evaluation(trainer, seed)
        with writing(work, partial=work):  # the Trainer's checkpoints: scratch, removed on a full disk
            trainer.train()
        dev = trainer.evaluate(data["dev"], metric_key_prefix="dev")
        test = trainer.evaluate(data["test"], metric_key_prefix="test")
        print(f"seed {seed}: best dev accuracy {dev['dev_accuracy']:.4f}, test accuracy {test['test_accuracy']:.4f}", flush=True)
        evals = [{"step": r["step"], "epoch": r["epoch"], "dev_accuracy": r["eval_accuracy"]}
                 for r in trainer.state.log_history if "eval_accuracy" in r]
        top = max(evals, key=lambda e: e["dev_accuracy"]) if evals else {}
        record = {"seed": seed, "protocol": key, "dev_accuracy": dev["dev_accuracy"], "test_accuracy": test["test_accuracy"],
                  "beats_majority": dev["dev_accuracy"] > majority["dev_best_constant"]["accuracy"],
                  "best_step": top.get("step"), "best_epoch": top.get("epoch"), "steps": plan.total_steps, "evals": evals,
                  "train_loss": next((r["train_loss"] for r in trainer.state.log_history if "train_loss" in r), math.nan),
                  "train_time_s": next((r["train_runtime"] for r in trainer.state.log_history if "train_runtime" in r), math.nan)}
        best_so_far = max((r["dev_accuracy"] for r in results), default=-1.0)
        if record["dev_accuracy"] > best_so_far:
            _save_model(trainer, tokenizer, out / "model", seed)
        atomic_write_text(cached, json.dumps(record, indent=2))
        results.append(record)
        shutil.rmtree(work, ignore_errors=True)
        del trainer, model
    shutil.rmtree(out / ".work", ignore_errors=True)
    best = max(results, key=lambda r: r["dev_accuracy"])
    stuck = [r["seed"] for r in results if not r["beats_majority"]]
    summary = {
        "kind": "finetune", "model": str(model_dir), "task": task.name, "task_kind": task.kind, "labels": task.label_names,
        "files": {s: getattr(task, s).path for s in ("train", "dev", "test")},
        "examples": {s: len(getattr(task, s).labels) for s in ("train", "dev", "test")},
        "settings": asdict(settings), "protocol": protocol,
        "dev_accuracy": _mean_sd([r["dev_accuracy"] for r in results]),
        "test_accuracy": _mean_sd([r["test_accuracy"] for r in results]),
        "majority_baseline": majority,
        # null, or why the numbers above are no evidence the model learned anything
        "majority_warning": _majority_warning(stuck, results, majority, settings),
        "saved_model": {"path": str(out / "model"), "seed": best["seed"]},
        "seeds": [{k: v for k, v in r.items() if k != "protocol"} for r in results],
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    return summary


def _majority(task: Task) -> dict:
    """Accuracy of always answering the most frequent training label: the chance level to beat.

    ``dev_best_constant`` is the best any single label scores on dev, the bar of the warning: a small seeded
    dev split's majority may differ from the training one, and a model stuck on that label must not pass.
    """
    top = max(task.label_names, key=task.train.labels.count)
    dev = task.dev.labels
    best = max(task.label_names, key=dev.count)
    return {"label": top, **{s: getattr(task, s).labels.count(top) / len(getattr(task, s).labels) for s in ("dev", "test")},
            "dev_best_constant": {"label": best, "accuracy": dev.count(best) / len(dev)}}


def _majority_warning(stuck: list, results: list, majority: dict, settings: FinetuneSettings) -> Optional[str]:
    """A one-line warning when some seed's best dev accuracy does not beat the majority label."""
    if not stuck:
        return None
    accs = ", ".join(f"{r['dev_accuracy']:.4f}" for r in results if r["seed"] in stuck)
    length = f"--steps {settings.steps}" if settings.steps is not None else f"--epochs {settings.epochs:g}"
    const = majority["dev_best_constant"]
    return (f"seed{'s' if len(stuck) > 1 else ''} {', '.join(map(str, stuck))} of {len(results)}: best dev accuracy "
            f"{accs} is no better than always answering '{const['label']}' ({const['accuracy']:.4f}); the model did not "
            f"learn the task ({length}, --lr {settings.lr:g}: try more steps or another learning rate)")


def _save_model(trainer, tokenizer, folder: Path, seed: int) -> None:
    """Write the fine-tuned model beside ``folder`` and move it into place (readers never see half a model)."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(folder, partial=tmp):  # a full disk: the previous best model stays in place
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_text(tmp / "finetune_seed.json", json.dumps({"seed": seed}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
