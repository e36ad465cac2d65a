"""Child samplers: which architecture trains at each step (DESIGN §3).

The child must be the same on every rank, so it is a pure function of (seed, step): SPOS draws it
from an RNG seeded by (seed, step); MAGIC-T's random walk is replayed from step 0 with one such RNG
per step (cheap: a few random draws per step), so any step can be asked for in any order.
Samplers whose ``aligns`` is true also train with the MAGIC-A alignment loss (see alignment.py).
"""
from __future__ import annotations

import random
from typing import Any

from .space import Arch, SearchSpace


def step_rng(seed: int, step: int, purpose: str = "child") -> random.Random:
    """A private RNG that is a pure function of (seed, step, purpose); string seeds hash with SHA-512."""
    return random.Random(f"{purpose}:{seed}:{step}")


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
        return self.space.random_arch(step_rng(self.seed, step))


def transition(space: SearchSpace, arch: Arch, k: int, rng: random.Random) -> Arch:
    """Change exactly ``k`` distinct layers (uniform) to a different candidate (uniform)."""
    child = list(arch)
    for layer in rng.sample(range(space.num_layers), k):
        others = [c for c in range(len(space.candidates)) if c != child[layer]]
        child[layer] = rng.choice(others)
    return tuple(child)


class MagicTSampler(Sampler):
    """MAGIC-T: child_{t+1} = child_t with ``k`` layers switched (k=1 is the paper's; k=L ~ SPOS)."""

    name = "magic-t"

    def __init__(self, space: SearchSpace, seed: int, k: int = 1, **options: Any):
        super().__init__(space, seed)
        if not 1 <= k <= space.num_layers:
            raise ValueError(f"sampler.k must be in [1, {space.num_layers}], got {k}")
        if len(space.candidates) < 2:
            raise ValueError("MAGIC-T needs at least two candidates")
        self.k = k
        self._reset()

    def _reset(self) -> None:
        self._step, self._child = 0, self.space.random_arch(step_rng(self.seed, 0))

    def sample(self, step: int) -> Arch:
        if step < self._step:
            self._reset()
        while self._step < step:
            self._step += 1
            self._child = transition(self.space, self._child, self.k, step_rng(self.seed, self._step))
        return self._child

    def state_dict(self) -> dict:
        return {"step": self._step, "child": list(self._child), "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._step, self._child = state["step"], tuple(state["child"])


class MagicASampler(SPOSSampler):
    name, aligns = "magic-a", True


class MagicSampler(MagicTSampler):
    name, aligns = "magic", True


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (SPOSSampler, MagicTSampler, MagicASampler, MagicSampler)
}


def build_sampler(name: str, space: SearchSpace, seed: int, **options: Any) -> Sampler:
    return SAMPLERS[name](space, seed, **options)
