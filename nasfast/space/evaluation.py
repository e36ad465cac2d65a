"""Dev evaluation of children with inherited (or their own) weights: MLM loss and accuracy."""
from __future__ import annotations

import math
import random
from typing import Callable

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


def reference_children(space: SearchSpace) -> dict[str, Arch]:
    """The fixed reference children, named by what they are (the same in every run of a space).

    ``largest_with_context`` / ``smallest_with_context``: most / fewest parameters among the children
    with a layer that mixes positions (the largest child by parameters alone is often all-FFN, which
    sees each token alone and scores at best the unigram baseline: no reference a NAS reader can use);
    ``smallest``: the smallest child overall. A child already listed under an earlier name is not
    repeated. A space without a mixing candidate has only ``largest`` and ``smallest``.
    """
    largest, smallest = space.largest_with_context(), space.smallest_with_context()
    if largest is None:  # no candidate mixes tokens: the old references are all there is
        named = {"largest": space.largest(), "smallest": space.smallest()}
    else:
        named = {"largest_with_context": largest, "smallest_with_context": smallest, "smallest": space.smallest()}
    children: dict[str, Arch] = {}
    for name, arch in named.items():
        if arch not in children.values():
            children[name] = arch
    return children


def representative_children(space: SearchSpace, num_random: int) -> dict[str, Arch]:
    """The reference children (``reference_children``) and a few fixed random children."""
    rng = random.Random(REPRESENTATIVE_SEED)
    children = reference_children(space)
    for i in range(num_random):
        children[f"random{i}"] = space.random_arch(rng)
    return children
