"""Arch-list files (one arch string per line) and seeded arch sets spread over parameter counts."""
from __future__ import annotations

import itertools
import random
from pathlib import Path

from nasfast.errors import UserError
from nasfast.space.searchspace import Arch, SearchSpace

POOL_PER_ARCH = 200  # random candidates drawn per requested child before stratifying


def read_archs(path: str | Path, space: SearchSpace) -> list[Arch]:
    """Parse an arch list; blank lines and ``#`` comments are skipped, duplicates dropped (order kept)."""
    from nasfast.files import read_text

    path = Path(path)
    archs: list[Arch] = []
    for lineno, line in enumerate(read_text(path, "arch list").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            arch = space.parse(line)
        except UserError as exc:
            raise UserError(f"{path}:{lineno}: {exc}") from None
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise UserError(f"arch list {path} is empty")
    return archs


def write_archs(path: str | Path, space: SearchSpace, archs: list[Arch]) -> None:
    from nasfast.files import atomic_write_text

    atomic_write_text(Path(path), "".join(space.arch_id(a) + "\n" for a in archs))


POOL_MAX_ENTRIES = 50_000_000  # layer entries of the sampling pool (a few hundred MB of tuples)


def max_sample(space: SearchSpace) -> int:
    """The largest --n whose pool stays within POOL_MAX_ENTRIES (and 10,000 children)."""
    return max(1, min(10_000, POOL_MAX_ENTRIES // (POOL_PER_ARCH * space.num_layers)))


def stratified_archs(space: SearchSpace, n: int, seed: int, params) -> list[Arch]:
    """``n`` distinct children, one from each of ``n`` equal-count parameter-count quantile bins.

    The pool is every child when the space is small, else POOL_PER_ARCH * n uniform random ones;
    ``params(arch)`` gives the exact parameter count. Sorted by parameter count.
    """
    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    if n > space.size:
        raise UserError(f"--n {n} is more than the {space.size} children of the space")
    limit = max_sample(space)
    if n > limit:  # the pool holds POOL_PER_ARCH * n archs of L layers: bound it before drawing
        raise UserError(f"--n {n:,} is more than the limit {limit:,} for a {space.num_layers}-layer space "
                        f"(a pool of {POOL_PER_ARCH} x n children is drawn)")
    rng = random.Random(seed)
    pool_size = POOL_PER_ARCH * n
    if space.size <= pool_size:
        pool = list(itertools.product(range(len(space.candidates)), repeat=space.num_layers))
    else:
        seen: set = set()
        while len(seen) < pool_size:
            seen.add(space.random_arch(rng))
        pool = sorted(seen)
    rng.shuffle(pool)  # ties in parameter count are broken at random, not by arch order
    pool.sort(key=params)
    bins = [pool[len(pool) * i // n : len(pool) * (i + 1) // n] for i in range(n)]
    return [rng.choice(b) for b in bins]
