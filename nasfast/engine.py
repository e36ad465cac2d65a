"""The engine seam: what the training loop asks of a training backend.

The loop (trainer.py) picks the child, the batches and the seeds, and decides when to log, evaluate,
checkpoint and stop. An engine owns the model's numerics: the forward pass and loss, backward,
gradient averaging across ranks, the optimizer step, and which objects hold its state.
``PlainEngine`` is PyTorch (one process, or data-parallel ranks with one coalesced all-reduce); a
DeepSpeed engine implements the same methods (``deepspeed.initialize`` wrapping the same Supernet,
``engine.backward``, ``engine.step``) and hands its state to the same Checkpointer, which is where the
run-folder guarantees (atomic, never non-finite, validated on load) live for both.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Protocol

import torch

from .alignment import aligned_forward
from .checkpointer import Stateful
from .config import Config
from .distributed import World, average_gradients
from .errors import UserError
from .optim import build_optimizer, build_scheduler, clip_and_step, retarget_schedule
from .samplers import SAMPLERS
from .space import Arch


class Engine(Protocol):
    """What the loop calls; every method runs on every rank."""

    model: torch.nn.Module

    def forward_loss(self, arch: Arch, batch: dict, layer_seed: int, anchor: Optional[Arch]) -> tuple[torch.Tensor, dict]:
        """Loss of child ``arch`` on one micro-batch (plus MAGIC-A alignment to ``anchor``), and what to log."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def average_gradients(self, params: list) -> None:
        """Average the gradients of ``params`` over data-parallel ranks."""

    def optimizer_step(self, arch: Arch) -> float:
        """Average, clip and apply the child's gradients; returns the gradient norm. A non-finite norm
        must leave weights and optimizer state unchanged (the loop then stops the run)."""

    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""

    def states(self) -> dict[str, Stateful]:
        """The engine's stateful parts, in load order, for the Checkpointer."""

    def describe(self) -> str:
        """One line for summary.json: which engine and layout trained the run."""

    def save_shards(self, step: int) -> dict:
        """Write per-rank state the Checkpointer's single file cannot hold (every rank, before that file);
        returns what that file records about it."""

    def load_shards(self, state: dict) -> None:
        """Restore per-rank state named by a checkpoint read by the Checkpointer."""

    def after_save(self, meta: dict) -> None:
        """The checkpoint file naming ``meta`` is on disk: drop state it no longer needs."""

    def after_load(self, cfg: Config) -> None:
        """Apply resume-time changes (``train.lr``, ``train.steps``) on top of the loaded state."""


def child_loss(model, cfg: Config, arch: Arch, batch: dict, layer_seed: int, anchor: Optional[Arch]) -> tuple[torch.Tensor, dict]:
    """MLM loss of ``arch``; with an anchor, + λ · alignment of its hidden states to the anchor's."""
    sc, al = cfg.sampler, cfg.align
    if anchor is None:
        loss = model(batch["input_ids"], batch["attention_mask"], arch, batch["labels"], layer_seed).loss
        extras = {"mlm_loss": float(loss.detach()), "align_loss": 0.0} if SAMPLERS[sc.name].aligns else {}
        return loss, extras  # no anchor (yet): MAGIC-A's warm-up trains plain MLM
    out = aligned_forward(model, batch, arch, anchor, layer_seed, al.prefix_sharing)
    return out.mlm_loss + al.weight * out.align_loss, {"mlm_loss": float(out.mlm_loss.detach()),
                                                             "align_loss": float(out.align_loss.detach())}


class PlainEngine:
    """PyTorch AdamW over the child's parameters; bf16 by autocast; ranks average child gradients."""

    def __init__(self, model: torch.nn.Module, cfg: Config, world: World, device: torch.device):
        self.model, self.cfg, self.world, self.device = model, cfg, world, device
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def autocast(self):
        if not self.cfg.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward_loss(self, arch: Arch, batch: dict, layer_seed: int, anchor: Optional[Arch]) -> tuple[torch.Tensor, dict]:
        with self.autocast():
            return child_loss(self.model, self.cfg, arch, batch, layer_seed, anchor)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def average_gradients(self, params: list) -> None:
        average_gradients(params, self.world)

    def optimizer_step(self, arch: Arch) -> float:
        params = [p for p in self.model.child_parameters(arch) if p.grad is not None]
        self.average_gradients(params)  # same child on every rank: the same params have grads
        return clip_and_step(params, self.optimizer, self.scheduler, self.cfg.train.clip_norm, skip_nonfinite=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def states(self) -> dict[str, Stateful]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def describe(self) -> str:
        return "plain" if not self.world.enabled else f"plain data-parallel x{self.world.size}"

    def save_shards(self, step: int) -> dict:
        return {}  # everything is in states(): the Checkpointer's one file holds it

    def load_shards(self, state: dict) -> None:
        pass

    def after_save(self, meta: dict) -> None:
        pass

    def after_load(self, cfg: Config) -> None:
        saved_lr = self.scheduler.base_lrs[0]
        if cfg.train.lr != saved_lr or self._schedule_changed():
            retarget_schedule(self.optimizer, self.scheduler, cfg.train.lr)

    def _schedule_changed(self) -> bool:
        """Did the loaded LR differ from what this config's schedule gives at the resumed step?"""
        f = self.scheduler.lr_lambdas[0]
        return any(g["lr"] != base * f(self.scheduler.last_epoch)
                   for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs))


def build_engine(model: torch.nn.Module, cfg: Config, world: World, device: torch.device, run_dir=None) -> Engine:
    """The engine for this run: DeepSpeed ZeRO when ``train.deepspeed`` names a config, else plain PyTorch."""
    if cfg.train.deepspeed:
        from .engine_deepspeed import DeepSpeedEngine, ds_env_defaults, load_ds_config

        ds_env_defaults()
        return DeepSpeedEngine(model, cfg, world, device, load_ds_config(cfg.train.deepspeed, cfg, world.size), run_dir)
    return PlainEngine(model, cfg, world, device)
