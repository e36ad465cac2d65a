"""metrics.jsonl and the loop's per-step bookkeeping (progress bar, tokens/s windows, eval cadence).

metrics.jsonl holds one strict-JSON object per logged step (NaN and inf are written as null), appended
and flushed as training goes, and fsynced before every checkpoint, so every line up to the
checkpoint's step survives a crash. On resume the lines after the checkpoint, and a line torn by a
kill, are dropped (they will be logged again) with an atomic rewrite.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tqdm.auto import tqdm

from nasfast.files import atomic_savefig, atomic_write_text, writing


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _parse(line: bytes) -> Optional[dict]:
    try:
        record = json.loads(line)
    except ValueError:  # a torn or damaged line (JSONDecodeError and UnicodeDecodeError)
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            self._drop_after(resume_step)
        self._fh = open(self.path, "a")

    def _drop_after(self, step: int) -> None:
        """Keep the lines of steps <= ``step``; drop later ones and a torn last line (rewritten atomically).

        Lines that do not parse in the middle of the file are kept as they are: resuming must not
        delete what a reader might still recover.
        """
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        torn = lines.pop() != b""  # no newline at the end: the last write was cut
        kept = []
        for line in lines:
            record = _parse(line) if line.strip() else None
            if record is not None and isinstance(record.get("step"), int) and record["step"] > step:
                continue
            if line.strip():
                kept.append(line)
        if not torn and len(kept) == len([l for l in lines if l.strip()]):
            return  # nothing to drop: no rewrite, so no window in which a kill could lose history
        atomic_write_text(self.path, b"".join(l + b"\n" for l in kept).decode("utf-8", "surrogateescape"))

    def write(self, record: dict) -> None:
        with self._appending():
            self._fh.write(dumps(record) + "\n")
            self._fh.flush()

    def sync(self) -> None:
        """Make every line written so far durable (called before each checkpoint)."""
        with self._appending():
            self._fh.flush()
            os.fsync(self._fh.fileno())

    @contextmanager
    def _appending(self) -> Iterator[None]:
        """A full disk is a StorageError naming metrics.jsonl. After a failed write the file is closed
        at once: its buffer still holds the lost line, and a flush at exit would print a second error.
        The torn line it may leave is dropped by the next resume."""
        try:
            with writing(self.path):
                yield
        except BaseException:
            try:
                self._fh.close()
            except OSError:
                pass
            raise

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict]:
    """Every parseable record of a metrics.jsonl (a torn last line is skipped)."""
    return [r for line in Path(path).read_bytes().split(b"\n") if line.strip() and (r := _parse(line)) is not None]


class Throughput:
    """Tokens per second over the steps since the last report; time spent evaluating is left out."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.restart()

    def restart(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def add_step(self) -> None:
        self._steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens_per_step * self._steps / max(now - self._start, 1e-9)
        self._start, self._steps = now, 0
        return rate


class TrainLogger:
    """Called once per finished step: progress bar, tokens/s, dev evaluation on its cadence, metrics.jsonl.

    A step is logged every ``log_every`` steps, at the last step, when the anchor changed, when it is
    evaluated (every ``eval_every`` steps and at the last), and when its loss or gradient norm is not
    finite (so a divergence is on record).
    """

    def __init__(self, train_cfg, tokens_per_step: int, start_step: int, log: Optional[MetricsLog], progress: bool):
        self.t, self.log = train_cfg, log
        self.throughput = Throughput(tokens_per_step)
        self.bar = tqdm(total=train_cfg.steps, initial=start_step, disable=not progress, desc="pretrain", unit="step",
                        dynamic_ncols=True)
        self.last_dev: dict = {}

    def step(self, step: int, record: dict, evaluate: Callable[[], dict]) -> None:
        t = self.t
        self.throughput.add_step()
        self.bar.update(1)
        finite = all(math.isfinite(record.get(k, 0.0)) for k in ("loss", "grad_norm"))
        due_eval = finite and (step % t.eval_every == 0 or step == t.steps)
        if not (due_eval or not finite or step % t.log_every == 0 or step == t.steps or record.get("anchor_changed")):
            return
        record["tokens_per_s"] = self.throughput.rate()
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if due_eval:
            record["dev"] = self.last_dev = evaluate()
            self.throughput.restart()  # evaluation time is not training throughput
        if self.log is not None:
            self.log.write({"step": step, **record})

    def sync(self) -> None:
        if self.log is not None:
            self.log.sync()

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG and free it: every nasfast plot is saved through here."""
    plt = pyplot()
    try:
        atomic_savefig(fig, path, dpi=dpi)  # a full disk leaves the previous plot, never a torn one
    finally:
        plt.close(fig)


def _finite(value: Any) -> float:
    """A logged number as a float; None (a non-finite value written as null) becomes NaN: a gap."""
    return math.nan if value is None else float(value)


def _anchor_changes(records: list[dict]) -> list[int]:
    """Steps at which MAGIC-A's anchor was first chosen or replaced (from the logged anchor fields)."""
    steps, previous = [], None
    for r in records:
        anchor = r.get("anchor")
        if anchor is not None and (r.get("anchor_changed") or (previous is None)):
            steps.append(r["step"])
        previous = anchor if anchor is not None else previous
    return steps


def curves_figure(records: list[dict], unigram: float | None = None):
    """The curves of a run: train MLM loss of the sampled child, dev MLM loss of each reference child,
    and for MAGIC-A runs a second panel with the alignment loss and the anchor changes.

    The train line is ``mlm_loss`` where the step logged one: ``loss`` of an aligned run is
    MLM + λ·alignment, not an MLM loss, so it is never drawn under that name.
    """
    plt = pyplot()
    aligned = any("align_loss" in r for r in records)
    fig, axes = plt.subplots(2 if aligned else 1, 1, figsize=(6.4, 6.2 if aligned else 4), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [2.2, 1]} if aligned else None)
    ax = axes[0][0]
    steps = [r["step"] for r in records]
    ax.plot(steps, [_finite(r.get("mlm_loss", r.get("loss"))) for r in records], color="0.6", lw=1,
            label="train MLM loss (sampled child)")
    evals = [r for r in records if "dev" in r]
    for name in (evals[-1]["dev"] if evals else {}):
        points = [(r["step"], _finite(r["dev"][name]["loss"])) for r in evals if name in r["dev"]]
        ax.plot(*zip(*points), marker="o", ms=3, label=f"dev {name.replace('_', ' ')}")
    if unigram is not None:
        ax.axhline(unigram, color="k", ls="--", lw=1, label=f"unigram baseline {unigram:.2f}")
    ax.set(ylabel="MLM loss (nats)", title="supernet pretraining")
    if aligned:
        _alignment_panel(axes[1][0], records, [ax])
    axes[-1][0].set_xlabel("step")
    for a in axes[:, 0]:
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _alignment_panel(ax, records: list[dict], others: list) -> None:
    """MAGIC-A's alignment loss per logged step; the anchor's choice and changes as dotted lines."""
    rows = [r for r in records if "align_loss" in r]
    ax.plot([r["step"] for r in rows], [_finite(r["align_loss"]) for r in rows], color="tab:purple", lw=1,
            label="alignment loss (sampled child vs anchor)")
    for i, step in enumerate(_anchor_changes(records)):
        for a in (ax, *others):
            a.axvline(step, color="0.35", ls=":", lw=1.2, label="anchor chosen or changed" if i == 0 and a is ax else None)
    ax.set_ylabel("alignment loss")
    ax.legend(fontsize=7)


def training_curves(path: Path, records: list[dict], unigram: float | None = None) -> None:
    """curves.png of a run (``curves_figure``) from its metrics.jsonl records."""
    save_figure(curves_figure(records, unigram), path)
