"""The plain PyTorch engine: one process, or data-parallel ranks with one coalesced all-reduce of
exactly the child's gradients (every rank trains the same child)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from nasfast.config import Config
from nasfast.distributed import World, average_gradients
from nasfast.engines.base import Stateful, child_loss
from nasfast.space.searchspace import Arch
from nasfast.training.optim import build_optimizer, build_scheduler, clip_and_step, retarget_schedule


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

    def optimizer_step(self, arch: Arch) -> float:
        params = [p for p in self.model.child_parameters(arch) if p.grad is not None]
        average_gradients(params, self.world)  # same child on every rank: the same params have grads (DeepSpeed reduces its own)
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
