"""MAGIC-A: align the sampled child's hidden states with those of a top-performing anchor child.

loss = MLM(child) + λ · Σ_l mean((h_l(child) − sg(h_l(anchor)))²), the anchor run under no_grad on
the same batch with the same per-layer dropout seeds. Layers before the first layer where child
and anchor differ compute identical hidden states, so the anchor starts from the child's hidden
state there (prefix sharing) and those layers add exactly zero to the loss.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .space import Arch, SearchSpace


def first_difference(child: Sequence[int], anchor: Sequence[int]) -> int:
    """Index of the first layer whose candidates differ (L if the architectures are equal)."""
    for layer, (a, b) in enumerate(zip(child, anchor)):
        if a != b:
            return layer
    return len(child)


@dataclass
class AlignedOutput:
    mlm_loss: torch.Tensor
    align_loss: torch.Tensor
    num_masked: int


def aligned_forward(model, batch: dict, child: Arch, anchor: Arch, layer_seed: Optional[int], prefix_sharing: bool = True) -> AlignedOutput:
    """Child forward with grad, anchor forward under no_grad sharing the child's common prefix."""
    mask = batch["attention_mask"].bool()
    embedded = model.embed(batch["input_ids"], layer_seed)
    hidden = model.run_layers(embedded, mask, child, layer_seed=layer_seed)
    out = model.mlm_output(hidden, batch["labels"])
    start = first_difference(child, anchor) if prefix_sharing else 0
    if start == len(child):
        return AlignedOutput(out.loss, out.loss.new_zeros(()), out.num_masked)
    with torch.no_grad():
        if prefix_sharing:
            anchor_input = (hidden[start - 1] if start else embedded).detach()
        else:
            anchor_input = model.embed(batch["input_ids"], layer_seed)
        anchor_hidden = model.run_layers(anchor_input, mask, anchor, start=start, layer_seed=layer_seed)
    align_mask = None if bool(mask.all()) else mask  # unpadded blocks (pretraining): the cheaper unmasked path
    align = model.ops.alignment_loss(hidden[start:], anchor_hidden, align_mask)
    return AlignedOutput(out.loss, align, out.num_masked)


class AnchorTracker:
    """The anchor child and its cached dev score (lower dev MLM loss is better).

    Every ``every`` steps the current child is scored on a fixed dev subset and replaces the anchor
    if it scores better. The anchor's score is computed once and cached, never recomputed.
    """

    def __init__(self, space: SearchSpace, init: str, seed: int, every: int, score: Callable[[Arch], float]):
        self.space, self.every, self.score_fn = space, every, score
        if init == "largest":
            self.anchor = space.largest()
        elif init == "random":
            self.anchor = space.random_arch(random.Random(f"anchor:{seed}"))
        else:
            self.anchor = space.parse(init)
        self.score: Optional[float] = None

    def maybe_update(self, step: int, child: Arch) -> dict:
        """Call after the optimizer step of ``step`` (0-based); returns what to log."""
        changed = False
        if (step + 1) % self.every == 0:
            if self.score is None:
                self.score = self.score_fn(self.anchor)
            if child != self.anchor:
                child_score = self.score_fn(child)
                if child_score < self.score:
                    self.anchor, self.score, changed = child, child_score, True
        return {"anchor": self.space.arch_id(self.anchor), "anchor_score": self.score, "anchor_changed": changed}

    def state_dict(self) -> dict:
        return {"anchor": list(self.anchor), "score": self.score}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.anchor, self.score = tuple(state["anchor"]), state["score"]
