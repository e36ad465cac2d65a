"""Supernet pretraining loop (plain PyTorch; DeepSpeed plugs in at the engine methods).

Each step reads like the algorithm: pick child -> forward -> loss -> backward -> step -> log.
All randomness of a step (masking, dropout) comes from a seed derived from (seed, step, micro-batch),
so a resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import Config, build_space, save_config
from .data import Corpus, build_corpus
from .distributed import World, average_gradients, barrier, init_from_env, reduce_step_state
from .errors import UserError
from .evaluation import evaluate_child, representative_children
from .metrics import MetricsLog, read_metrics
from .plots import training_curves
from .alignment import AnchorTracker, aligned_forward
from .samplers import build_sampler
from .space import Arch
from .supernet import Supernet, child_forward_flops, child_num_params

CHECKPOINT = "checkpoints/last.pt"


def micro_seed(seed: int, step: int, micro: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def micro_batches(corpus: Corpus, t, step: int, device: torch.device, world: World = World()):
    """The micro-batches of training step ``step`` with their seeds: batch, masking and dropout are
    functions of (seed, step, micro, rank) only. Shared by the supernet trainer and standalone children."""
    for micro in range(t.grad_accum):
        seed = micro_seed(t.seed, step, micro, world.rank)
        torch.manual_seed(seed)  # masking; dropout is reseeded per layer from the same seed
        idx = corpus.train_batch_indices(t.seed, step * t.grad_accum + micro, t.batch_size, world.rank, world.size)
        yield seed, {k: v.to(device) for k, v in corpus.collate(corpus.train_blocks[idx]).items()}


def clip_and_step(params: list, optimizer, scheduler, clip_norm: float) -> float:
    """Clip the gradient norm of ``params`` (0 disables), step optimizer and schedule; returns the norm."""
    if clip_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available")
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(name)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 1.0 - (1.0 - min_ratio) * min(1.0, progress)

    return f


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms. Params without a grad (other children's
    candidates) are skipped by torch's AdamW, so their weights and state stay bit-for-bit."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-6)
    if decay and decay[0].is_cuda:
        fused_adam = _apex_fused_adam()
        if fused_adam is not None:  # NVIDIA apex, when built on this machine; it also skips grad-less params
            return fused_adam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _apex_fused_adam():
    """apex.optimizers.FusedAdam if NVIDIA apex is importable, else None (never pip-install 'apex':
    that PyPI name is an unrelated web package)."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:
        return None
    return FusedAdam


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, stop_after: Optional[int] = None, progress: bool = True):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.stop_after, self.progress = stop_after, progress
        self._signal: Optional[int] = None
        ckpt = self.run_dir / CHECKPOINT
        if resume and not ckpt.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt}")
        if not resume and ckpt.is_file():
            raise UserError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
        self.device = resolve_device(cfg.train.device)
        self.world = init_from_env(self.device.type)
        self.space = build_space(cfg)
        if self.world.is_main:  # rank 0 writes the run folder; the others read its data copy
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in (self.run_dir / CHECKPOINT).parent.glob(".*.tmp-*"):
                stale.unlink()  # a writer killed mid-save (SIGKILL) leaves its temp file behind
            save_config(cfg, self.run_dir / "config.yaml")
            self.corpus: Corpus = build_corpus(cfg.data, self.run_dir)
        barrier(self.world)
        if not self.world.is_main:
            self.corpus = build_corpus(cfg.data, self.run_dir)
        torch.manual_seed(cfg.train.seed)
        self.model = Supernet(cfg.model, self.space, self.corpus.vocab_size, backend="eager").to(self.device)
        self.model.set_backend(cfg.kernels.backend, self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        t = cfg.train
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))
        self.sampler = build_sampler(cfg.sampler.name, self.space, t.seed, k=cfg.sampler.k, walk=cfg.sampler.walk)
        self.dev = self.corpus.dev_batches(t.batch_size, t.eval_batches)
        self.anchor = self._build_anchor() if self.sampler.aligns else None
        self.eval_children = representative_children(self.space, t.eval_random_children)
        self.step = 0
        if resume:
            self._load(ckpt)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resume else None) if self.world.is_main else None

    def _build_anchor(self) -> AnchorTracker:
        """MAGIC-A's anchor, scored on the anchor-selection split (disjoint from self.dev)."""
        sc, t = self.cfg.sampler, self.cfg.train
        anchor_data = self.corpus.anchor_batches(t.batch_size)

        def score(archs):
            return [evaluate_child(self.model, arch, anchor_data, self.device)["loss"] for arch in archs]

        return AnchorTracker(self.space, sc.anchor_init, t.seed, sc.anchor_every, sc.warmup_steps(t.steps), score=score)

    # --- engine seam: a DeepSpeed engine overrides these three ---------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, arch: Arch) -> float:
        params = [p for p in self.model.child_parameters(arch) if p.grad is not None]
        average_gradients(params, self.world)  # same child on every rank: the same params have grads
        return clip_and_step(params, self.optimizer, self.scheduler, self.cfg.train.clip_norm)

    def forward_loss(self, arch: Arch, batch: dict, layer_seed: int, anchor: Optional[Arch] = None) -> tuple[torch.Tensor, dict]:
        sc = self.cfg.sampler
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            if anchor is None:
                loss = self.model(batch["input_ids"], batch["attention_mask"], arch, batch["labels"], layer_seed).loss
                extras = {} if self.anchor is None else {"mlm_loss": float(loss.detach()), "align_loss": 0.0}
                return loss, extras  # no anchor (yet): MAGIC-A's warm-up trains plain MLM
            out = aligned_forward(self.model, batch, arch, anchor, layer_seed, sc.prefix_sharing)
        return out.mlm_loss + sc.align_weight * out.align_loss, {"mlm_loss": float(out.mlm_loss.detach()), "align_loss": float(out.align_loss.detach())}

    # --- one training step ---------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        arch = self.sampler.sample(step)
        anchor = self.anchor.anchor_for(step) if self.anchor is not None else None
        self.model.train()
        total_loss = 0.0
        extras: dict = {}
        for seed, batch in micro_batches(self.corpus, t, step, self.device, self.world):
            loss, extras = self.forward_loss(arch, batch, seed, anchor)
            self.backward(loss / t.grad_accum)
            total_loss += float(loss.detach()) / t.grad_accum
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.optimizer_step(arch)
        if self.anchor is not None:
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
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.data.block_size
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and self.world.is_main), desc="pretrain",
                   unit="step", dynamic_ncols=True)
        start_step, started = self.step, time.perf_counter()
        window_t, window_steps, status = time.perf_counter(), 0, "completed"
        last_dev: dict = {}
        try:
            while self.step < t.steps:
                record = self.train_step(self.step)
                record["loss"], stop = reduce_step_state(record["loss"], self._signal is not None, self.world, self.device)
                self.step += 1
                window_steps += 1
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps or record.get("anchor_changed"):
                    now = time.perf_counter()
                    record["tokens_per_s"] = tokens_per_step * window_steps / (now - window_t)
                    window_t, window_steps = now, 0
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if self.step % t.eval_every == 0 or self.step == t.steps:
                        record["dev"] = last_dev = self.evaluate()
                        window_t = time.perf_counter()  # evaluation time is not training throughput
                    if self.metrics:
                        self.metrics.write({"step": self.step, **record})
                if not math.isfinite(record["loss"]):
                    status = "diverged"
                    break
                if self.step % t.ckpt_every == 0:
                    self.save_checkpoint()
                if stop:  # a signal on any rank stops every rank after the same step
                    name = signal.Signals(self._signal).name if self._signal is not None else "SIGTERM"
                    status = f"interrupted by {name}"
                    break
                if self.stop_after is not None and self.step - start_step >= self.stop_after:
                    status = "stopped"
                    break
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        self.save_checkpoint()
        elapsed = time.perf_counter() - started
        summary = self._summary(status, elapsed, (self.step - start_step) * tokens_per_step, last_dev)
        if self.metrics:
            checkpoint.atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            self.metrics.close()
            training_curves(self.run_dir / "curves.png", read_metrics(self.metrics.path), summary["unigram_entropy"])
        return summary

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # finish the current step, checkpoint, then stop

    def _summary(self, status: str, elapsed: float, tokens: int, dev: dict) -> dict:
        vocab, T = self.corpus.vocab_size, self.cfg.data.block_size
        children = {
            name: {
                "arch": self.space.arch_id(arch),
                "params": child_num_params(self.space, arch, vocab, self.cfg.model.max_len),
                "flops_per_sequence": child_forward_flops(self.space, arch, vocab, T),
            }
            for name, arch in self.eval_children.items()
        }
        return {
            "status": status,
            "step": self.step,
            "steps": self.cfg.train.steps,
            "wall_time_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "unigram_entropy": self.corpus.unigram_entropy(self.dev),
            "dev": dev,
            "children": children,
            "supernet_params": sum(p.numel() for p in self.model.parameters()),
            "search_space_size": self.space.size,
            "device": str(self.device),
            "backend": self.model.ops.name,
        }

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.world.is_main:  # ranks hold identical weights and optimizer states
            self._write_checkpoint()
        barrier(self.world)

    def _write_checkpoint(self) -> None:
        checkpoint.atomic_save(
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "anchor": self.anchor.state_dict() if self.anchor else None,
                "rng": checkpoint.rng_state(),
                "data_position": {"micro_steps_done": self.step * self.cfg.train.grad_accum, "seed": self.cfg.train.seed},
                "config": self.cfg.to_dict(),
            },
            self.run_dir / CHECKPOINT,
        )

    def _load(self, path: Path) -> None:
        state = checkpoint.load(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.anchor is not None:
            self.anchor.load_state_dict(state.get("anchor"))
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
