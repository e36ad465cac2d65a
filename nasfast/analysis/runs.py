"""Open a finished (or checkpointed) run folder: its config, space, data and supernet weights.

A run folder holds config.yaml, data/ (tokenizer + blocks.npz, or a reference to prepared data), checkpoints/last.pt. Analysis
commands read the data from the run folder itself so the tokenizer and blocks are exactly the run's.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nasfast.config import Config
from nasfast.data.blocks import Corpus, build_corpus
from nasfast.device import resolve_device
from nasfast.errors import UserError
from nasfast.kernels.registry import check_backend
from nasfast.space.checks import build_space, load_run_config
from nasfast.space.searchspace import SearchSpace
from nasfast.training.checkpointer import CHECKPOINT, load_model_state, read_checkpoint


@dataclass
class Run:
    path: Path
    cfg: Config
    space: SearchSpace
    corpus: Corpus
    device: torch.device

    def dev_batches(self, num_batches: Optional[int] = None) -> list[dict]:
        """The fixed, pre-masked dev batches; ``None`` = every dev block."""
        bs = self.cfg.train.batch_size
        if num_batches is None:
            num_batches = math.ceil(len(self.corpus.dev_blocks) / bs)
        if num_batches <= 0:
            raise UserError(f"the number of dev batches must be positive, got {num_batches}")
        return self.corpus.dev_batches(bs, num_batches)

    def with_seed(self, seed: int) -> "Run":
        """The same run with another train.seed (ground-truth replicates: init, batch order, masking)."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.seed = seed
        return dataclasses.replace(self, cfg=cfg)

    def supernet(self):
        """The supernet with the checkpoint's weights, in eval mode (dropout off)."""
        from nasfast.space.supernet import Supernet

        ckpt = self.path / CHECKPOINT
        if not ckpt.is_file():
            raise UserError(f"run {self.path} has no checkpoint at {ckpt}")
        check_backend(self.cfg.kernels.backend, self.device)
        state = read_checkpoint(ckpt)
        model = Supernet(self.cfg.model, self.space, self.corpus.vocab_size, backend="eager")
        load_model_state(model, state["model"], ckpt)
        model.set_backend(self.cfg.kernels.backend, self.device)
        return model.to(self.device).eval()


def open_run(path: str | Path, device: Optional[str] = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run folder not found: {path}")
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} is not a run folder (no config.yaml)")
    if not (path / "data" / "blocks.npz").is_file() and not (path / "data" / "prepared.json").is_file():
        raise UserError(f"run {path} has no data folder (data/blocks.npz)")
    cfg = load_run_config(path / "config.yaml")
    corpus = build_corpus(cfg.data, path, require=True)
    return Run(path, cfg, build_space(cfg), corpus, resolve_device(device or cfg.train.device))


def dev_description(run: Run, batches: list[dict]) -> dict:
    """What identifies a dev set: compared by ``rank`` so estimates and truth use the same one."""
    return {"blocks": int(sum(len(b["input_ids"]) for b in batches)), "batch_size": run.cfg.train.batch_size}
