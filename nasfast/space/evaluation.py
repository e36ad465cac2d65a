"""Dev evaluation of children with inherited (or their own) weights: MLM loss and accuracy."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch

from nasfast.space.searchspace import Arch, SearchSpace

REPRESENTATIVE_SEED = 777  # the fixed random children evaluated in every run


@torch.no_grad()
def evaluate_mlm(forward: Callable, batches: list[dict], device: torch.device) -> dict:
    """``forward(input_ids, attention_mask, labels) -> ModelOutput``; token-weighted mean loss."""
    total_loss, total_masked, total_correct = 0.0, 0, 0
    for batch in batches:
        out = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device))
        total_loss += float(out.loss) * out.num_masked
        total_masked += out.num_masked
        total_correct += out.num_correct
    loss = total_loss / max(total_masked, 1)
    return {"loss": loss, "accuracy": total_correct / max(total_masked, 1), "ppl": math.exp(min(loss, 50.0))}


def evaluate_child(supernet, arch: Arch, batches: list[dict], device: torch.device) -> dict:
    was_training = supernet.training
    supernet.eval()
    try:
        return evaluate_mlm(lambda i, m, l: supernet(i, m, arch, l), batches, device)
    finally:
        supernet.train(was_training)


def representative_children(space: SearchSpace, num_random: int) -> dict[str, Arch]:
    """Largest, smallest and a few fixed random children (the same in every run of a space)."""
    rng = random.Random(REPRESENTATIVE_SEED)
    children = {"largest": space.largest(), "smallest": space.smallest()}
    for i in range(num_random):
        children[f"random{i}"] = space.random_arch(rng)
    return children
