"""Data parallelism across processes (torchrun-style env vars), without DDP's module wrapper.

Every rank trains the same child (derived from (seed, step)), so the set of parameters with
gradients is identical everywhere; the trainer averages exactly those gradients with one
coalesced all-reduce. DDP itself is a poor fit for a supernet: its bucket plan assumes every step
uses the same parameters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def init_from_env(device_type: str) -> World:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR (torchrun sets them)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def average_gradients(params: list, world: World) -> None:
    """Average the gradients of ``params`` over ranks in one coalesced all-reduce."""
    if not world.enabled or not params:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_step_state(loss: float, stop: bool, world: World, device: torch.device) -> tuple[float, bool]:
    """Mean loss over ranks, and stop if any rank was asked to (a signal reaches ranks at different steps)."""
    if not world.enabled:
        return loss, stop
    t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]) / world.size, bool(t[1] > 0)
