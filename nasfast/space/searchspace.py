"""The search space (docs/protocols.md §1): L layers, each picks one candidate operator.

Candidates are the kinds registered in ``nasfast.space.candidates`` (``mha:h``, ``ffn:d``, ``conv:k``,
``identity``, … and any kind registered with ``register_candidate``). Every (layer, candidate) owns
its own weights, so two children share weights exactly where they pick the same candidate at a layer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from nasfast.errors import UserError
from nasfast.space.candidates import CANDIDATES, Candidate

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

    # --- children with context (docs/protocols.md: references and anchors must mix tokens) ----------
    @property
    def context_candidates(self) -> list[int]:
        """Indices of the candidates that mix positions (``Candidate.mixes_tokens``: mha, conv)."""
        return [i for i, c in enumerate(self.candidates) if c.mixes_tokens]

    def has_context(self, arch: Sequence[int]) -> bool:
        """Whether ``arch`` has a layer that mixes positions; without one it sees every token alone
        and can learn only unigram statistics (it cannot beat the unigram baseline)."""
        return any(self.candidates[i].mixes_tokens for i in arch)

    def _extreme_with_context(self, pick: Callable) -> Optional[Arch]:
        """The child that ``pick`` (min or max) selects by parameters among those with context.

        Costs are additive over layers and every layer has the same candidates, so the optimum puts
        the best context candidate on one layer (layer 0: every later layer then sees context) and
        the overall best on the others; if that one mixes tokens itself, it fills every layer.
        """
        context = self.context_candidates
        if not context:
            return None
        params = lambda i: self.candidates[i].num_params(self.hidden)  # noqa: E731
        overall = pick(range(len(self.candidates)), key=params)
        if self.candidates[overall].mixes_tokens:
            return (overall,) * self.num_layers
        return (pick(context, key=params),) + (overall,) * (self.num_layers - 1)

    def largest_with_context(self) -> Optional[Arch]:
        """The child with the most parameters among those with context (None: no candidate mixes tokens)."""
        return self._extreme_with_context(max)

    def smallest_with_context(self) -> Optional[Arch]:
        """The child with the fewest parameters among those with context (None: no candidate mixes tokens)."""
        return self._extreme_with_context(min)

    def random_arch_with_context(self, rng: random.Random) -> Arch:
        """A uniform random child among those with context (rejection sampling: the first draw when it
        has context, so the draws match ``random_arch``'s then); any child if no candidate mixes tokens."""
        while True:
            arch = self.random_arch(rng)
            if not self.context_candidates or self.has_context(arch):
                return arch

    def cost_range(self, cost: Callable[[Candidate], int]) -> tuple[Arch, Arch]:
        """(cheapest, costliest) child by an additive per-layer ``cost``: exact, without enumerating
        the space, because a sum over layers is minimal (maximal) where each layer is."""
        order = sorted(range(len(self.candidates)), key=lambda i: cost(self.candidates[i]))
        return (order[0],) * self.num_layers, (order[-1],) * self.num_layers

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
