"""Child samplers: which architecture trains at each step.

The child must be the same on every rank, so it is derived from (seed, step) and from state that
every rank updates identically (never from rank-local RNG). Samplers are registered by name.
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

    def __init__(self, space: SearchSpace, seed: int, **options: Any):
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


SAMPLERS: dict[str, type[Sampler]] = {"spos": SPOSSampler}


def build_sampler(name: str, space: SearchSpace, seed: int, **options: Any) -> Sampler:
    return SAMPLERS[name](space, seed, **options)
