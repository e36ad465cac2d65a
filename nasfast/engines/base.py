"""The engine seam: what the training loop asks of a training backend.

The loop (``nasfast.training.trainer``) picks the child, the batches and the seeds, and decides when to log, evaluate,
checkpoint and stop. An engine owns the model's numerics: the forward pass and loss, backward,
gradient averaging across ranks, the optimizer step, and which objects hold its state.
``PlainEngine`` is PyTorch (one process, or data-parallel ranks with one coalesced all-reduce); a
DeepSpeed engine implements the same methods (``deepspeed.initialize`` wrapping the same Supernet,
``engine.backward``, ``engine.step``) and hands its state to the same Checkpointer, which is where the
run-folder guarantees (atomic, never non-finite, validated on load) live for both.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from nasfast.config import Config
from nasfast.space.alignment import aligned_forward
from nasfast.space.samplers import SAMPLERS
from nasfast.space.searchspace import Arch
from nasfast.training.checkpointer import Stateful


class Engine(Protocol):
    """What the loop calls; every method runs on every rank."""

    model: torch.nn.Module

    def forward_loss(self, arch: Arch, batch: dict, layer_seed: int, anchor: Optional[Arch]) -> tuple[torch.Tensor, dict]:
        """Loss of child ``arch`` on one micro-batch (plus MAGIC-A alignment to ``anchor``), and what to log."""

    def backward(self, loss: torch.Tensor) -> None: ...

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
    out = aligned_forward(model, batch, arch, anchor, layer_seed, al.prefix_sharing, al.anchor_precision == "bf16")
    return out.mlm_loss + al.weight * out.align_loss, {"mlm_loss": float(out.mlm_loss.detach()),
                                                             "align_loss": float(out.align_loss.detach())}
