"""MAGIC-A: align the sampled child's hidden states with those of a top-performing anchor child.

loss = MLM(child) + λ · Σ_l mean((h_l(child) − sg(h_l(anchor)))²), the anchor run under no_grad on
the same batch with the same per-layer dropout seeds. Layers before the first layer where child
and anchor differ compute identical hidden states, so the anchor starts from the child's hidden
state there (prefix sharing) and those layers add exactly zero to the loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from nasfast.rng import python_rng
from nasfast.space.searchspace import Arch, SearchSpace


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


def aligned_forward(model, batch: dict, child: Arch, anchor: Arch, layer_seed: Optional[int], prefix_sharing: bool = True,
                    anchor_bf16: bool = False) -> AlignedOutput:
    """Child forward with grad, anchor forward under no_grad sharing the child's common prefix.

    ``anchor_bf16``: the anchor's layers run under bf16 autocast and their outputs are cast back to the
    child's dtype for the loss (a faster, bf16-rounded target; the child's forward is unchanged).
    """
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
        # not autocast(enabled=False) for fp32: that would switch off an enclosing train.bf16 autocast
        precision = (torch.autocast(anchor_input.device.type, dtype=torch.bfloat16) if anchor_bf16
                     else contextlib.nullcontext())
        with precision:
            anchor_hidden = model.run_layers(anchor_input, mask, anchor, start=start, layer_seed=layer_seed)
        if anchor_bf16:
            anchor_hidden = [a.to(h.dtype) for a, h in zip(anchor_hidden, hidden[start:])]
    align_mask = None if bool(mask.all()) else mask  # unpadded blocks (pretraining): the cheaper unmasked path
    align = model.ops.alignment_loss(hidden[start:], anchor_hidden, align_mask)
    return AlignedOutput(out.loss, align, out.num_masked)


def anchor_init_count(init: str) -> Optional[int]:
    """N for ``best:N`` (None for the other forms); raises ValueError for a malformed ``best:``."""
    if not init.startswith("best:"):
        return None
    n = init.partition(":")[2]
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"anchor_init 'best:N' needs a positive integer N, got {init!r}")
    return int(n)


class AnchorTracker:
    """The MAGIC-A anchor: a top-performing child that the sampled children are aligned with.

    - Scoring: ``score(archs)`` returns the dev MLM loss of each arch on the *current* weights, on an
      anchor-selection split disjoint from the data used for estimates and ground truth. Lower wins.
    - Warm-up: the first ``warmup`` steps train without alignment (``anchor_for`` returns None), so
      the initial anchor is chosen on weights that already separate good children from bad ones.
    - Initial anchor (chosen at step ``warmup``): ``best:N`` scores N seeded random children together
      and takes the best; ``random`` a seeded random child; ``largest`` the largest child by
      parameters; or an arch. The drawn and ``largest`` anchors are children *with context* (a layer
      that mixes positions, ``SearchSpace.has_context``), the notion the run's reference children use:
      a context-free child (e.g. all FFN) learns only unigram statistics, a target not worth aligning to.
    - Challenge: every ``every`` steps after the warm-up the current child challenges the anchor and
      BOTH are scored in the same call on the same weights. A score cached when the anchor was
      installed goes stale as the supernet improves, and then almost any challenger wins.
    """

    def __init__(self, space: SearchSpace, init: str, seed: int, every: int, warmup: int,
                 score: Callable[[Sequence[Arch]], list[float]]):
        self.space, self.init, self.seed = space, init, seed
        self.every, self.warmup, self.score_fn = every, warmup, score
        self.anchor: Optional[Arch] = None
        self.score: Optional[float] = None  # the anchor's score at its last scoring (for logs only)
        self.challenges = self.replacements = 0
        if init not in ("largest", "random") and anchor_init_count(init) is None:
            self.fixed: Optional[Arch] = space.parse(init)
        else:
            self.fixed = None

    def _initial(self) -> Arch:
        rng = python_rng(self.seed, purpose="anchor")  # the same draws as the historical "anchor:{seed}" seed
        if self.init == "largest":
            return self.space.largest_with_context() or self.space.largest()  # or: no candidate mixes tokens
        if self.init == "random":
            return self.space.random_arch_with_context(rng)
        if self.fixed is not None:
            return self.fixed
        n = anchor_init_count(self.init)
        draws = (self.space.random_arch_with_context(rng) for _ in range(n))
        pool = list(dict.fromkeys(draws))  # distinct, in draw order
        scores = self.score_fn(pool)
        best = min(range(len(pool)), key=lambda i: scores[i])
        self.score = scores[best]
        return pool[best]

    def anchor_for(self, step: int) -> Optional[Arch]:
        """The anchor to align with at ``step`` (None during the warm-up); picks the initial one."""
        if step < self.warmup:
            return None
        if self.anchor is None:
            self.anchor = self._initial()
        return self.anchor

    def maybe_update(self, step: int, child: Arch) -> dict:
        """Call after the optimizer step of ``step`` (0-based); returns what to log."""
        changed, challenger_score = False, None
        done = step + 1 - self.warmup
        if self.anchor is not None and done > 0 and done % self.every == 0 and child != self.anchor:
            self.score, challenger_score = self.score_fn([self.anchor, child])  # same weights for both
            self.challenges += 1
            if challenger_score < self.score:
                self.anchor, self.score, changed = child, challenger_score, True
                self.replacements += 1
        return {
            "anchor": None if self.anchor is None else self.space.arch_id(self.anchor),
            "anchor_score": self.score, "challenger_score": challenger_score, "anchor_changed": changed,
        }

    def state_dict(self) -> dict:
        return {"anchor": None if self.anchor is None else list(self.anchor), "score": self.score,
                "challenges": self.challenges, "replacements": self.replacements}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.anchor = None if state["anchor"] is None else tuple(state["anchor"])
            self.score = state["score"]
            self.challenges, self.replacements = state.get("challenges", 0), state.get("replacements", 0)
