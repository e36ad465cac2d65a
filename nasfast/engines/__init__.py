"""Engines: how a child's step is computed and applied: plain PyTorch (one process or data-parallel
ranks) and DeepSpeed ZeRO-1/2/3 (``deepspeed``, with ``zero_child``'s child-only optimizer step). May
import the leaves, kernels, space and training's building blocks (optim, checkpointer); never the
training loop, nas or cli."""
from __future__ import annotations

import torch

from nasfast.config import Config
from nasfast.distributed import World
from nasfast.engines.base import Engine


def build_engine(model: torch.nn.Module, cfg: Config, world: World, device: torch.device, run_dir=None) -> Engine:
    """The engine for this run: DeepSpeed ZeRO when ``train.deepspeed`` names a config, else plain PyTorch."""
    if cfg.train.deepspeed:
        from nasfast.engines.deepspeed import DeepSpeedEngine, ds_env_defaults, load_ds_config

        ds_env_defaults()
        return DeepSpeedEngine(model, cfg, world, device, load_ds_config(cfg.train.deepspeed, cfg, world.size), run_dir)
    from nasfast.engines.plain import PlainEngine

    return PlainEngine(model, cfg, world, device)
