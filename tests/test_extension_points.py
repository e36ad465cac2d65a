"""Issue-13 acceptance: a new candidate kind that calls a new fused op, both registered from this file
only, trains through the real trainer, and the op's fused kernel runs inside the step."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from conftest import MICRO_OVERRIDES
from test_op_registry import TOY_OP, Counted, scaled_tanh_fused

from nasfast.config import ModelConfig, load_config
from nasfast.kernels import registry as backend
from nasfast.kernels.registry import Backend
from nasfast.space.candidates import CANDIDATES, Candidate, CandidateModule, register_candidate
from nasfast.training.metrics import read_metrics
from nasfast.training.trainer import Trainer


class GatedTanhModule(CandidateModule):
    """``LayerNorm(x + scaled_tanh(x W, g))``: a sublayer whose nonlinearity is the toy fused op."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        self.gain = torch.nn.Parameter(torch.empty(hidden))
        self.norm = torch.nn.LayerNorm(hidden, eps=eps)

    def init_weights(self, init) -> None:
        init.normal_(self.gain, mean=1.0, std=0.1)

    def forward(self, x, token_mask, ops):
        return self.norm(x + ops.scaled_tanh(self.proj(x), self.gain))  # the backend picks fused or reference


@dataclass(frozen=True)
class GatedTanh(Candidate):
    kind: ClassVar[str] = "gtanh"
    usage: ClassVar[str] = "gtanh"

    def num_params(self, hidden: int) -> int:
        return hidden * hidden + hidden + hidden + 2 * hidden

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        return 2 * seq_len * hidden * hidden

    def build(self, hidden: int, cfg: ModelConfig) -> torch.nn.Module:
        return GatedTanhModule(hidden, cfg.layer_norm_eps)


def test_toy_candidate_calling_a_toy_op_trains_one_step(tmp_path):
    kernel = Counted(scaled_tanh_fused)
    register_candidate(GatedTanh)
    backend.register_op(TOY_OP)
    backend.register_backend(Backend("toy_tanh", impls={"scaled_tanh": kernel}))
    try:
        cfg = load_config(None, MICRO_OVERRIDES + ["space.candidates=[gtanh]", "kernels.backend=toy_tanh",
                                                   "train.steps=1", "train.warmup_steps=1", "train.eval_every=1",
                                                   "train.ckpt_every=1"])
        assert GatedTanh().num_params(cfg.model.hidden) == sum(
            p.numel() for p in GatedTanh().build(cfg.model.hidden, cfg.model).parameters())
        summary = Trainer(cfg, tmp_path / "run", progress=False).train()
        assert summary["status"] == "completed" and summary["fused_ops"] == ["scaled_tanh"]
        assert kernel.calls >= cfg.space.layers  # the fused kernel ran in every layer of the step
        step = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
        assert math.isfinite(step["loss"]) and set(step["child"].split("|")) == {"gtanh"}
        saved = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert saved["fused_ops"] == ["scaled_tanh"]
    finally:
        backend.unregister_backend("toy_tanh")
        backend.unregister_op("scaled_tanh")
        CANDIDATES.pop("gtanh", None)
