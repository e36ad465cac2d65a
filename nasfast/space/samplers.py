"""Child samplers: which architecture trains at each step.

- ``spos``: a uniformly random child every step (single-path one-shot).
- ``magic-t``: a walk on the architecture graph; consecutive children differ in exactly ``k`` layers
  (k=1 is the paper's MAGIC-T). Note that k = L is *not* SPOS: every layer is forced to change, so
  with two candidates the walk alternates between a child and its complement.
- ``magic-a`` / ``magic``: SPOS / MAGIC-T children trained with the MAGIC-A alignment loss
  (``aligns`` is true; see alignment.py).

MAGIC-T's walk (``walk``): the paper does not say how the changed layer and the new candidate are
picked. ``uniform`` picks both uniformly; over a short run that spreads updates unevenly over
operators (in 1000 steps of a 4-layer, 7-candidate space, 92-206 updates per operator against
115-168 for SPOS), a confound when comparing samplers. ``balanced`` visits the layers in a shuffled
round-robin (a fresh permutation every L steps) and switches the layer to one of its least-visited
candidates (ties broken at random), still exactly one change per step for k=1.

The child must be the same on every rank, so it is a pure function of (seed, step): SPOS draws it
from an RNG seeded by (seed, step); a walk is replayed from step 0 with one such RNG per step
(cheap: a few random draws per step), so any step can be asked for in any order.
"""
from __future__ import annotations

import random
from typing import Any

from nasfast.rng import python_rng
from nasfast.space.searchspace import Arch, SearchSpace


class Sampler:
    """Interface: ``sample(step)`` returns the child for that step; state round-trips via state_dict."""

    name = "base"
    aligns = False  # train with the MAGIC-A alignment loss

    def __init__(self, space: SearchSpace, seed: int, k: int = 1, **options: Any):
        self.space, self.seed = space, seed

    def sample(self, step: int) -> Arch:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SPOSSampler(Sampler):
    """Single-path one-shot: a uniformly random child every step."""

    name = "spos"

    def sample(self, step: int) -> Arch:
        return self.space.random_arch(python_rng(self.seed, step))


def transition(space: SearchSpace, arch: Arch, k: int, rng: random.Random) -> Arch:
    """Change exactly ``k`` distinct layers (uniform) to a different candidate (uniform)."""
    child = list(arch)
    for layer in rng.sample(range(space.num_layers), k):
        others = [c for c in range(len(space.candidates)) if c != child[layer]]
        child[layer] = rng.choice(others)
    return tuple(child)


class BalancedWalk:
    """State of the balanced walk: the layer order of the current round and visits per (layer, candidate).

    Each step takes the next ``k`` layers of a shuffled round-robin (a new permutation of the layers
    every L layer-changes, drawn from the step's RNG) and moves each to one of its least-visited
    other candidates. Pure state, so it round-trips through a checkpoint as plain lists.
    """

    def __init__(self, space: SearchSpace, start: Arch):
        self.space = space
        self.order: list[int] = []  # layers still to change in this round
        self.visits = [[0] * len(space.candidates) for _ in range(space.num_layers)]
        for layer, cand in enumerate(start):
            self.visits[layer][cand] += 1

    def next_layers(self, k: int, rng: random.Random) -> list[int]:
        layers: list[int] = []
        while len(layers) < k:
            if not self.order:
                self.order = rng.sample(range(self.space.num_layers), self.space.num_layers)
            layer = self.order.pop(0)
            if layer not in layers:  # k > 1 across a round boundary: never change one layer twice
                layers.append(layer)
        return layers

    def step(self, arch: Arch, k: int, rng: random.Random) -> Arch:
        child = list(arch)
        for layer in self.next_layers(k, rng):
            others = [c for c in range(len(self.space.candidates)) if c != child[layer]]
            fewest = min(self.visits[layer][c] for c in others)
            child[layer] = rng.choice([c for c in others if self.visits[layer][c] == fewest])
            self.visits[layer][child[layer]] += 1
        return tuple(child)

    def state_dict(self) -> dict:
        return {"order": list(self.order), "visits": [list(v) for v in self.visits]}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.visits = list(state["order"]), [list(v) for v in state["visits"]]


WALKS = ("uniform", "balanced")


class MagicTSampler(Sampler):
    """MAGIC-T: child_{t+1} = child_t with exactly ``k`` layers switched (k=1 is the paper's)."""

    name = "magic-t"

    def __init__(self, space: SearchSpace, seed: int, k: int = 1, walk: str = "uniform", **options: Any):
        super().__init__(space, seed)
        if not 1 <= k <= space.num_layers:
            raise ValueError(f"sampler.k must be in [1, {space.num_layers}], got {k}")
        if len(space.candidates) < 2:
            raise ValueError("MAGIC-T needs at least two candidates")
        if walk not in WALKS:
            raise ValueError(f"sampler.walk must be one of {', '.join(WALKS)}, got {walk!r}")
        self.k, self.walk = k, walk
        self._reset()

    def _reset(self) -> None:
        self._step, self._child = 0, self.space.random_arch(python_rng(self.seed, 0))
        self._balanced = BalancedWalk(self.space, self._child) if self.walk == "balanced" else None

    def sample(self, step: int) -> Arch:
        if step < self._step:
            self._reset()
        while self._step < step:
            self._step += 1
            rng = python_rng(self.seed, self._step)
            if self._balanced is not None:
                self._child = self._balanced.step(self._child, self.k, rng)
            else:
                self._child = transition(self.space, self._child, self.k, rng)
        return self._child

    def state_dict(self) -> dict:
        state = {"step": self._step, "child": list(self._child), "k": self.k, "walk": self.walk}
        if self._balanced is not None:
            state["balanced"] = self._balanced.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("k", self.k) != self.k or state.get("walk", "uniform") != self.walk:
            raise ValueError(f"checkpoint sampler (k={state.get('k')}, walk={state.get('walk', 'uniform')}) "
                             f"differs from the config (k={self.k}, walk={self.walk})")
        self._step, self._child = state["step"], tuple(state["child"])
        if self._balanced is not None:
            self._balanced.load_state_dict(state["balanced"])


class MagicASampler(SPOSSampler):
    name, aligns = "magic-a", True


class MagicSampler(MagicTSampler):
    name, aligns = "magic", True


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (SPOSSampler, MagicTSampler, MagicASampler, MagicSampler)
}


def build_sampler(name: str, space: SearchSpace, seed: int, **options: Any) -> Sampler:
    return SAMPLERS[name](space, seed, **options)
