"""Supernet pretraining loop.

Read ``train_step`` (one step: pick child -> forward -> loss -> backward -> optimizer step) and
``_loop`` (step, log/evaluate, checkpoint, stop) together: that is the whole loop, one screen. Setup
(``_start``) and the end of a run (``_finish``) are named helpers below and above them. The numerics
live behind the engine seam (``nasfast.engines``), the run folder's rules in ``runfolder``, checkpoint
contents and guarantees in ``checkpointer``, logging and throughput in ``metrics``.
All randomness of a step (masking, dropout) comes from a seed derived from (seed, step, micro-batch),
so a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from nasfast import rng
from nasfast.config import Config
from nasfast.data.blocks import Corpus, build_corpus
from nasfast.data.loader import StepLoader
from nasfast.device import resolve_device
from nasfast.distributed import barrier, init_from_env, reduce_step_state
from nasfast.engines import build_engine
from nasfast.engines.base import Engine
from nasfast.errors import UserError
from nasfast.faults import kill_point
from nasfast.kernels.registry import check_backend
from nasfast.space.alignment import AnchorTracker
from nasfast.space.checks import build_space
from nasfast.space.evaluation import evaluate_child, representative_children
from nasfast.space.samplers import SAMPLERS, build_sampler
from nasfast.space.supernet import Supernet, child_forward_flops, child_num_params, space_cost_range
from nasfast.training.checkpointer import CHECKPOINT, Checkpointer, NonFiniteState, RngState
from nasfast.training.memory import check_step_fits
from nasfast.training.metrics import MetricsLog, TrainLogger, read_metrics, training_curves
from nasfast.training.runfolder import RunFolder, check_resume_changes

__all__ = ["Trainer", "Diverged"]


class Diverged(Exception):
    """A non-finite loss, gradient norm or state: the run stops and keeps its last good checkpoint."""


class StopSignals:
    """SIGTERM / SIGINT set a flag: the loop finishes the step, checkpoints and stops."""

    def __enter__(self) -> "StopSignals":
        self.received: Optional[int] = None
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class RunClock:
    """Training time and tokens summed over every invocation of a run (each up to its last checkpoint)."""

    def __init__(self) -> None:
        self.saved_s, self.tokens, self._since = 0.0, 0, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        self.saved_s, self._since = self.elapsed(), None

    def elapsed(self) -> float:
        return self.saved_s + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed(), "tokens": self.tokens}

    def load_state_dict(self, state: Optional[dict]) -> None:
        state = state or {}  # checkpoints written before the clock existed
        self.saved_s, self.tokens = float(state.get("elapsed_s", 0.0)), int(state.get("tokens", 0))


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, stop_after: Optional[int] = None, progress: bool = True):
        if stop_after is not None and stop_after < 1:
            raise UserError(f"--stop-after must be >= 1, got {stop_after}")
        self.cfg, self.stop_after, self.progress = cfg, stop_after, progress
        self.device = resolve_device(cfg.train.device)
        check_backend(cfg.kernels.backend, self.device)
        self.world = init_from_env(self.device.type)
        self.space = build_space(cfg)
        self.folder = RunFolder(run_dir, writer=self.world.is_main)
        self.run_dir = self.folder.path
        try:
            self._start(resume)
        except BaseException:
            self.folder.release()
            raise

    def _start(self, resume: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.folder.open(resume)
        self.checkpointer = Checkpointer(self.run_dir / CHECKPOINT, {}, writer=self.world.is_main, optional=("clock",))
        if self.world.is_main:
            self.checkpointer.clean_stale()
            self.checkpointer.check_writable()  # before the first step, not after hours of training
        saved = self._read_checkpoint() if resume else None
        if self.world.is_main:  # rank 0 writes the run folder; the others read its data copy
            if not resume:
                self.folder.discard_leftovers()
            self.corpus: Corpus = build_corpus(cfg.data, self.run_dir, fresh=not resume, require=resume)
        barrier(self.world)
        if not self.world.is_main:
            self.corpus = build_corpus(cfg.data, self.run_dir, require=True)
        if not t.deepspeed:  # refuse a step that cannot fit before the model's first allocation (ZeRO shards it)
            check_step_fits(cfg, self.space, self.corpus.vocab_size, self.device, "a training step",
                            aligns=SAMPLERS[cfg.sampler.name].aligns)
        with rng.isolated("cpu"):  # weights are initialised on the CPU from train.seed; the caller's RNG is kept
            rng.seed_global(t.seed)
            model = Supernet(cfg.model, self.space, self.corpus.vocab_size, backend="eager")
        model = model.to(self.device)
        model.set_backend(cfg.kernels.backend, self.device)
        self.engine: Engine = build_engine(model, cfg, self.world, self.device, self.run_dir)
        self.sampler = build_sampler(cfg.sampler.name, self.space, t.seed, k=cfg.sampler.k, walk=cfg.sampler.walk)
        self.dev = self.corpus.dev_batches(t.batch_size, t.eval_batches)
        self.anchor = self._build_anchor() if self.sampler.aligns else None
        self.eval_children = representative_children(self.space, t.eval_random_children)
        self.clock = RunClock()
        self.loader = StepLoader(self.corpus, t, self.device, self.world, prefetch=cfg.data.prefetch)
        self.loop_s = 0.0  # this invocation's time in the training loop (the data-wait share's denominator)
        self.checkpointer.states = {
            **self.engine.states(), "sampler": self.sampler, "anchor": self.anchor, "rng": RngState(), "clock": self.clock,
        }
        self.step = 0
        if saved is not None:
            self.step = self.checkpointer.load(saved)
            self.engine.load_shards(saved)  # DeepSpeed: weights and optimizer live in per-rank shards
            self.engine.after_load(cfg)
        kill_point("startup")
        if self.world.is_main:
            self.folder.save_config(cfg)  # only now: every input has been checked and the checkpoint fits
        self.metrics = MetricsLog(self.folder.metrics_path, resume_step=self.step if resume else None) if self.world.is_main else None

    def _read_checkpoint(self) -> dict:
        """The checkpoint to resume from, checked against the config before anything is built or written."""
        state = self.checkpointer.read()
        if isinstance(state.get("config"), dict):
            check_resume_changes(state["config"], self.cfg)
        if self.cfg.train.steps < state["step"]:
            raise UserError(f"train.steps={self.cfg.train.steps} is below the checkpoint's step {state['step']}; "
                            f"resume with train.steps >= {state['step']}")
        return state

    def _build_anchor(self) -> AnchorTracker:
        """MAGIC-A's anchor, scored on the anchor-selection split (disjoint from self.dev)."""
        al, t = self.cfg.align, self.cfg.train
        anchor_data = self.corpus.anchor_batches(t.batch_size)

        def score(archs):
            return [evaluate_child(self.model, arch, anchor_data, self.device)["loss"] for arch in archs]

        return AnchorTracker(self.space, al.anchor_init, t.seed, al.anchor_every, al.warmup_steps(t.steps), score=score)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    # --- one training step ---------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        arch = self.sampler.sample(step)
        anchor = self.anchor.anchor_for(step) if self.anchor is not None else None
        self.model.train()
        total_loss = 0.0
        extras: dict = {}
        for seed, batch in self.loader.get(step):
            loss, extras = self.engine.forward_loss(arch, batch, seed, anchor)
            self.engine.backward(loss / t.grad_accum)
            total_loss += float(loss.detach()) / t.grad_accum
        kill_point("mid-step")
        lr = self.engine.lr()
        grad_norm = self.engine.optimizer_step(arch)
        if self.anchor is not None and math.isfinite(grad_norm):
            extras.update(self.anchor.maybe_update(step, arch))
        return {"loss": total_loss, "lr": lr, "grad_norm": grad_norm, "child": self.space.arch_id(arch), **extras}

    def evaluate(self) -> dict:
        return {
            name: {**evaluate_child(self.model, arch, self.dev, self.device), "arch": self.space.arch_id(arch)}
            for name, arch in self.eval_children.items()
        }

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        try:
            if self.step >= t.steps:  # resuming a run that already reached its last step
                return self._finish_completed()
            tokens_per_step = t.batch_size * t.grad_accum * self.cfg.data.block_size
            log = TrainLogger(t, tokens_per_step, self.step, self.metrics, self.progress and self.world.is_main)
            self.clock.start()
            with StopSignals() as signals:  # also while the last checkpoint and the summary are written
                try:
                    with rng.isolated(self.device):  # whatever still reseeds torch's global RNG stays inside
                        status = self._loop(log, signals)
                except Diverged as exc:
                    status, self.diverged = "diverged", str(exc)
                self.clock.stop()
                log.close()
                kill_point("after-final-checkpoint")
                return self._finish(status, log.last_dev)
        finally:
            self.loader.close()
            self.folder.release()

    def _loop(self, log: TrainLogger, signals: StopSignals) -> str:
        """Train until the last step, a signal or --stop-after, checkpoint, and return the status."""
        t, start_step, status = self.cfg.train, self.step, "completed"
        started = time.perf_counter()
        while self.step < t.steps:
            record = self.train_step(self.step)
            record["loss"], stop = reduce_step_state(record["loss"], signals.received is not None, self.world, self.device)
            self.step += 1
            self.clock.tokens += log.throughput.tokens_per_step
            log.step(self.step, record, self.evaluate)
            self._check_finite(record)
            if self.step % t.ckpt_every == 0:
                self.save_checkpoint(log)
            if stop:  # a signal on any rank stops every rank after the same step
                status = f"interrupted by {signal.Signals(signals.received or signal.SIGTERM).name}"
                break
            if self.stop_after is not None and self.step - start_step >= self.stop_after:
                status = "stopped"
                break
        self.loop_s += time.perf_counter() - started
        if self.checkpointer.last_step != self.step:
            self.save_checkpoint(log)
        return status

    def _check_finite(self, record: dict) -> None:
        for key in ("loss", "grad_norm"):
            if not math.isfinite(record[key]):
                raise Diverged(f"non-finite {key.replace('_', ' ')} at step {self.step}, {self._last_good()}; {self._recovery()}")

    def _last_good(self) -> str:
        if self.checkpointer.last_step is None:
            return "no checkpoint was written"
        return f"last good checkpoint is step {self.checkpointer.last_step} ({self.checkpointer.path})"

    def _recovery(self) -> str:
        """What to do after a divergence: --resume only when there is a checkpoint to resume from."""
        if self.checkpointer.last_step is None:
            return ("nothing to resume: start the run again without --resume (same --out) with a lower train.lr "
                    "or train.clip_norm set")
        return "lower train.lr or set train.clip_norm, then --resume"

    def save_checkpoint(self, log: Optional[TrainLogger] = None) -> None:
        if log is not None:
            log.sync()  # every metrics line up to this step is on disk before the checkpoint says so
        # The config is checked on resume; the data position needs no field of its own: the batch of step s
        # is a pure function of (train.seed, s), both already saved.
        meta = {"config": self.cfg.to_dict()}
        try:
            shards = self.engine.save_shards(self.step)  # every rank writes its shard first; the file below commits it
            if shards:
                meta.update(shards)
                barrier(self.world)
            self.checkpointer.save(self.step, meta)
        except NonFiniteState as exc:
            raise Diverged(f"{exc}; {self._recovery()}") from None
        barrier(self.world)
        self.engine.after_save(meta)

    # --- the end of a run ----------------------------------------------------------------------
    def _finish(self, status: str, dev: dict) -> dict:
        summary = self._summary(status, dev)
        if status == "diverged":
            summary["message"] = self.diverged
        if self.world.is_main:
            self._write_curves(summary["unigram_entropy"])
            self.folder.write_summary(summary)  # last: a complete summary.json marks a finished invocation
        return summary

    def _finish_completed(self) -> dict:
        """``--resume`` of a run at its last step: keep its summary; rebuild it if a kill lost it."""
        saved = self.folder.read_summary() if self.world.is_main else None
        if saved is not None and saved["status"] == "completed" and saved["step"] == self.step == saved["steps"]:
            return {**saved, "already_completed": True}
        if self.metrics is not None:
            self.metrics.close()
        return self._finish("completed", self.evaluate())

    def _write_curves(self, unigram: float) -> None:
        records = [{**r, "loss": math.nan if r.get("loss") is None else r["loss"]} for r in read_metrics(self.folder.metrics_path)]
        tmp = self.folder.curves_path.with_name(f".curves.tmp-{os.getpid()}.png")
        training_curves(tmp, records, unigram)
        os.replace(tmp, self.folder.curves_path)

    def _summary(self, status: str, dev: dict) -> dict:
        vocab, T = self.corpus.vocab_size, self.cfg.data.block_size
        children = {
            name: {
                "arch": self.space.arch_id(arch),
                "params": child_num_params(self.space, arch, vocab, self.cfg.model.max_len),
                "flops_per_sequence": child_forward_flops(self.space, arch, vocab, T),
            }
            for name, arch in self.eval_children.items()
        }
        elapsed = self.clock.elapsed()
        return {
            "status": status,
            "step": self.step,
            "steps": self.cfg.train.steps,
            "wall_time_s": elapsed,
            "tokens_per_s": self.clock.tokens / elapsed if elapsed > 0 else 0.0,
            "unigram_entropy": self.corpus.unigram_entropy(self.dev),
            "dev": dev,
            "children": children,
            "supernet_params": sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters()),  # ZeRO-3: full size
            "search_space_size": self.space.size,
            "search_space_range": space_cost_range(self.space, vocab, self.cfg.model.max_len, T),  # min, max
            "device": str(self.device),
            "backend": self.model.ops.name,
            "fused_ops": list(self.model.ops.fused),  # the other ops ran the eager reference
            "engine": self.engine.describe(),
            # this invocation: seconds the loop waited for batches, and their share of the loop's time
            "data_wait_s": self.loader.wait_s,
            "data_wait_share": self.loader.wait_s / self.loop_s if self.loop_s > 0 else 0.0,
            "data": self.corpus.source or {"path": str(self.run_dir / "data"), "copy": True},
        }
