"""The search space (docs/protocols.md §1): L layers, each picks one candidate operator.

Candidates are the kinds registered in ``nasfast.space.candidates`` (``mha:h``, ``ffn:d``, ``conv:k``,
``identity``, … and any kind registered with ``register_candidate``). Every (layer, candidate) owns
its own weights, so two children share weights exactly where they pick the same candidate at a layer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from nasfast.space.candidates import CANDIDATES, Candidate
from nasfast.errors import UserError

__all__ = ["CANDIDATES", "Candidate", "SearchSpace", "Arch", "hamming"]


Arch = tuple  # a tuple of L candidate indices into SearchSpace.candidates


@dataclass(frozen=True)
class SearchSpace:
    num_layers: int
    candidates: tuple[Candidate, ...]
    hidden: int

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise UserError(f"space.layers must be positive, got {self.num_layers}")
        if not self.candidates:
            raise UserError("space.candidates is empty")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise UserError(f"space.candidates has duplicates: {names}")
        for c in self.candidates:
            c.validate(self.hidden)

    @staticmethod
    def from_names(num_layers: int, names: Iterable[str], hidden: int) -> "SearchSpace":
        return SearchSpace(num_layers, tuple(Candidate.parse(n) for n in names), hidden)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]

    @property
    def size(self) -> int:
        """Number of distinct children."""
        return len(self.candidates) ** self.num_layers

    # --- architectures -------------------------------------------------------------------------
    def arch_id(self, arch: Sequence[int]) -> str:
        self.validate(arch)
        return "|".join(self.candidates[i].name for i in arch)

    def parse(self, text: str) -> Arch:
        parts = [p.strip() for p in str(text).split("|")]
        if len(parts) != self.num_layers:
            raise UserError(f"arch '{text}' has {len(parts)} layers, the space has {self.num_layers}")
        index = {c.name: i for i, c in enumerate(self.candidates)}
        arch = []
        for p in parts:
            cand = Candidate.parse(p)
            if cand.name not in index:
                raise UserError(f"arch '{text}': candidate '{p}' is not in the space ({', '.join(self.names)})")
            arch.append(index[cand.name])
        return tuple(arch)

    def validate(self, arch: Sequence[int]) -> None:
        if len(arch) != self.num_layers or any(not 0 <= int(i) < len(self.candidates) for i in arch):
            raise UserError(f"arch {tuple(arch)} does not fit a space of {self.num_layers} layers x {len(self.candidates)} candidates")

    def random_arch(self, rng: random.Random) -> Arch:
        return tuple(rng.randrange(len(self.candidates)) for _ in range(self.num_layers))

    def largest(self) -> Arch:
        best = max(range(len(self.candidates)), key=lambda i: self.candidates[i].num_params(self.hidden))
        return (best,) * self.num_layers

    def smallest(self) -> Arch:
        best = min(range(len(self.candidates)), key=lambda i: self.candidates[i].num_params(self.hidden))
        return (best,) * self.num_layers

    # --- cost model ----------------------------------------------------------------------------
    def layer_params(self, arch: Sequence[int]) -> int:
        return sum(self.candidates[i].num_params(self.hidden) for i in arch)

    def layer_flops(self, arch: Sequence[int], seq_len: int) -> int:
        return sum(self.candidates[i].forward_flops(self.hidden, seq_len) for i in arch)


def hamming(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of layers whose candidates differ."""
    if len(a) != len(b):
        raise ValueError("architectures of different depth")
    return sum(x != y for x, y in zip(a, b))
