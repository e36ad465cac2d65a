"""Architecture search under a parameter / FLOPs budget: evolutionary, or random as the baseline.

Evolution (``strategy="evolution"``), with ``P`` = population and ``G`` = generations:
- generation 0: ``P`` distinct children drawn uniformly among those under the budget (rejection;
  under a budget so tight that rejection fails, random children repaired by cheaper single-layer swaps);
- each later generation: ``P`` new offspring of the ``parents`` best children evaluated so far
  (elitist, as in SPOS's search). An offspring is, with probability ``crossover``, a per-layer
  uniform crossover of two parents, else a copy of one parent; then, with probability
  ``mutation_prob`` (always for a copy), one layer's operator is replaced by another candidate.
  Offspring over the budget or already evaluated are rejected and redrawn; after ``MAX_TRIES``
  rejections a fresh random child under the budget is taken instead.
Random search (``strategy="random"``) draws ``P * G`` distinct children under the budget: the same
number of evaluations, the baseline the NAS literature finds hard to beat.

A child's score is its inherited-weight dev MLM loss (lower is better), computed with
``nasfast evaluate``'s code (``evaluation.evaluate_child`` on the run's fixed dev batches). Scores are
cached one JSON per child in ``OUT/cache/``; since every draw is a function of the seed and the
scores, an interrupted search replays from the cache and continues, and a rerun evaluates nothing.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm.auto import tqdm

from nasfast.errors import UserError
from nasfast.files import atomic_write_text
from nasfast.space.searchspace import Arch, SearchSpace

STRATEGIES = ("evolution", "random")
MAX_TRIES = 200  # rejected draws per offspring before falling back to a fresh random child
SAMPLE_TRIES = 2_000  # uniform draws per random child before falling back to repaired draws
REPAIR_TRIES = 200  # repaired draws before the space counts as exhausted under the budget
CACHE_VERSION = 1

Cost = Callable[[Arch], tuple]  # arch -> (params, flops)
Scorer = Callable[[list], list]  # list of archs -> list of dicts with a "score" (lower is better)


@dataclass(frozen=True)
class Budget:
    max_params: Optional[int] = None
    max_flops: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_params is None and self.max_flops is None:
            raise UserError("give a budget: --max-params N and/or --max-flops N")
        for name, value in (("--max-params", self.max_params), ("--max-flops", self.max_flops)):
            if value is not None and value <= 0:
                raise UserError(f"{name} must be positive, got {value}")

    def fits(self, params: int, flops: int) -> bool:
        return (self.max_params is None or params <= self.max_params) and (self.max_flops is None or flops <= self.max_flops)


MAX_EVALUATIONS = 1_000_000  # children a search may score; more can only be a typo (each is a dev pass)


@dataclass
class SearchSettings:
    strategy: str = "evolution"
    population: int = 16
    generations: int = 6
    parents: Optional[int] = None  # default: population // 2
    mutation_prob: float = 0.5
    crossover: float = 0.5
    seed: int = 0
    top_k: int = 5

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(msg)

        need(self.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        need(self.population >= 2, f"--population must be >= 2, got {self.population}")
        need(self.generations >= 1, f"--generations must be >= 1, got {self.generations}")
        if self.parents is None:
            self.parents = max(2, self.population // 2)
        need(self.parents >= 1, f"--parents must be >= 1, got {self.parents}")
        need(0.0 <= self.mutation_prob <= 1.0, f"--mutation-prob must be in [0, 1], got {self.mutation_prob}")
        need(0.0 <= self.crossover <= 1.0, f"--crossover must be in [0, 1], got {self.crossover}")
        need(self.top_k >= 1, f"--top-k must be >= 1, got {self.top_k}")
        need(self.evaluations <= MAX_EVALUATIONS, f"--population {self.population:,} x --generations "
             f"{self.generations:,} = {self.evaluations:,} children, more than the limit {MAX_EVALUATIONS:,} (a typo?)")

    @property
    def evaluations(self) -> int:
        return self.population * self.generations


@dataclass
class Child:
    arch: Arch
    generation: int
    origin: str  # random | mutation | crossover | crossover+mutation
    params: int
    flops: int
    scores: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return self.scores["score"]


# --- budget-aware sampling and variation --------------------------------------------------------
class BudgetSampler:
    """Draws children under the budget; costs are additive per layer (exact params / FLOPs)."""

    def __init__(self, space: SearchSpace, budget: Budget, cost: Cost, rng: random.Random):
        self.space, self.budget, self.cost, self.rng = space, budget, cost, rng
        self.rejected = 0

    def fits(self, arch: Arch) -> bool:
        return self.budget.fits(*self.cost(arch))

    def check_feasible(self) -> None:
        """Refuse a budget no child meets (the cheapest child, per constrained cost, is over it)."""
        for index, name in ((0, "params"), (1, "flops")):
            limit = self.budget.max_params if index == 0 else self.budget.max_flops
            if limit is None:
                continue
            cheapest = min(range(len(self.space.candidates)), key=lambda c: self.cost((c,) * self.space.num_layers)[index])
            low = self.cost((cheapest,) * self.space.num_layers)[index]
            if low > limit:
                raise UserError(f"no child fits the budget: the cheapest child has {low:,} {name} > {limit:,}")

    def random(self, seen: set) -> Optional[Arch]:
        """A uniform random child under the budget not in ``seen`` (rejection sampling); when the budget
        is so tight that rejection fails, a random child repaired down to the budget; None when neither
        finds a new child."""
        for _ in range(SAMPLE_TRIES):
            arch = self.space.random_arch(self.rng)
            if arch not in seen and self.fits(arch):
                return arch
        for _ in range(REPAIR_TRIES):
            arch = self.repair(self.space.random_arch(self.rng))
            if arch is not None and arch not in seen:
                return arch
        return None

    def _load(self, arch: Arch) -> float:
        """Cost relative to the budget (max over the constrained quantities); <= 1 means it fits."""
        params, flops = self.cost(arch)
        return max(params / self.budget.max_params if self.budget.max_params else 0.0,
                   flops / self.budget.max_flops if self.budget.max_flops else 0.0)

    def repair(self, arch: Arch) -> Optional[Arch]:
        """Random single-layer swaps to cheaper candidates until ``arch`` fits; None if it cannot."""
        while not self.fits(arch):
            load = self._load(arch)
            cheaper = [arch[:l] + (c,) + arch[l + 1 :] for l in range(self.space.num_layers)
                       for c in range(len(self.space.candidates)) if c != arch[l]]
            cheaper = [a for a in cheaper if self._load(a) < load]
            if not cheaper:
                return None
            arch = self.rng.choice(cheaper)
        return arch

    def mutate(self, arch: Arch) -> Arch:
        """One layer's operator replaced by a different candidate."""
        layer = self.rng.randrange(self.space.num_layers)
        choice = self.rng.choice([c for c in range(len(self.space.candidates)) if c != arch[layer]])
        return arch[:layer] + (choice,) + arch[layer + 1 :]

    def crossover(self, a: Arch, b: Arch) -> Arch:
        """Each layer's operator from one of the two parents, uniformly."""
        return tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b))

    def offspring(self, parents: list, seen: set, crossover: float, mutation_prob: float) -> Optional[tuple]:
        """(arch, origin): a new child under the budget, bred from ``parents``."""
        for _ in range(MAX_TRIES):
            if len(parents) >= 2 and self.rng.random() < crossover:
                a, b = self.rng.sample(parents, 2)
                arch, origin = self.crossover(a, b), "crossover"
                if self.rng.random() < mutation_prob or arch in (a, b):
                    arch, origin = self.mutate(arch), "crossover+mutation"
            else:
                arch, origin = self.mutate(self.rng.choice(parents)), "mutation"
            if arch not in seen and self.fits(arch):
                return arch, origin
            self.rejected += 1
        arch = self.random(seen)
        return None if arch is None else (arch, "random")


# --- evaluation cache -------------------------------------------------------------------------
class ScoreCache:
    """One JSON per child in ``folder``, valid for one protocol (checkpoint + dev set)."""

    def __init__(self, folder: Path, protocol: dict):
        self.folder = Path(folder)
        self.protocol = protocol
        self.key = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:16]

    def path(self, arch_id: str) -> Path:
        return self.folder / f"{hashlib.sha1(arch_id.encode()).hexdigest()}.json"

    def get(self, arch_id: str) -> Optional[dict]:
        path = self.path(arch_id)
        if not path.is_file():
            return None
        from nasfast import filevalues as fv

        record = fv.load_cache_entry(path)
        if record.get("arch") != arch_id:
            raise UserError(f"cache entry {path} is for another child; remove it")
        if record.get("protocol") != self.key:
            raise UserError(f"cache {self.folder} holds scores of another checkpoint or dev set; use another --out")
        scores = fv.mapping(path, "scores", record.get("scores"))
        fv.scores(path, scores, ("score", *(k for k in ("loss", "accuracy") if k in scores)), prefix="scores.")
        return record["scores"]

    def put(self, arch_id: str, scores: dict) -> None:
        atomic_write_text(self.path(arch_id), json.dumps({"arch": arch_id, "protocol": self.key, "scores": scores}))


# --- the search loop ----------------------------------------------------------------------------
def pareto_front(children: Sequence[Child]) -> list:
    """Children not dominated in (params, score), both minimised; sorted by params."""
    front, best = [], float("inf")
    for c in sorted(children, key=lambda c: (c.params, c.score)):
        if c.score < best:
            front.append(c)
            best = c.score
    return front


def run_search(
    space: SearchSpace, budget: Budget, cost: Cost, score: Scorer, settings: SearchSettings,
    cache: Optional[ScoreCache] = None, progress: bool = True,
) -> dict:
    """Search; ``score([arch])`` is called only for children not in ``cache``."""
    rng = random.Random(settings.seed)
    sampler = BudgetSampler(space, budget, cost, rng)
    sampler.check_feasible()
    children: list[Child] = []
    seen: set = set()
    computed = cached = 0
    exhausted = False
    bar = tqdm(total=settings.evaluations, desc=f"search ({settings.strategy})", unit="child", disable=not progress, dynamic_ncols=True)

    def evaluate(batch: list[Child]) -> None:
        nonlocal computed, cached
        todo = []
        for child in batch:
            hit = cache.get(space.arch_id(child.arch)) if cache is not None else None
            if hit is not None:
                child.scores = hit
                cached += 1
                bar.update(1)
            else:
                todo.append(child)
        for child in todo:  # one at a time, cached at once: an interruption loses at most one evaluation
            child.scores = score([child.arch])[0]
            if cache is not None:
                cache.put(space.arch_id(child.arch), child.scores)
            computed += 1
            bar.update(1)
        children.extend(batch)
        best = min(children, key=lambda c: c.score)
        bar.set_postfix_str(f"best {best.score:.4f}")

    for generation in range(settings.generations):
        batch: list[Child] = []
        parents = [c.arch for c in sorted(children, key=lambda c: (c.score, space.arch_id(c.arch)))[: settings.parents]]
        while len(batch) < settings.population:
            if settings.strategy == "random" or generation == 0:
                arch = sampler.random(seen)
                drawn = None if arch is None else (arch, "random")
            else:
                drawn = sampler.offspring(parents, seen, settings.crossover, settings.mutation_prob)
            if drawn is None:
                exhausted = True
                break
            seen.add(drawn[0])
            batch.append(Child(drawn[0], generation, drawn[1], *cost(drawn[0])))
        if batch:
            evaluate(batch)
        if exhausted:
            break
    bar.close()
    ranked = sorted(children, key=lambda c: (c.score, space.arch_id(c.arch)))  # ties: by the arch string users see
    record = lambda c: {"arch": space.arch_id(c.arch), "params": c.params, "flops": c.flops, "generation": c.generation,  # noqa: E731
                        "origin": c.origin, **c.scores}
    return {
        "kind": "search",
        "strategy": settings.strategy,
        "budget": asdict(budget),
        "settings": asdict(settings),
        "evaluations": {"total": len(children), "computed": computed, "cached": cached, "rejected_offspring": sampler.rejected,
                        "exhausted": exhausted},
        "best": record(ranked[0]) if ranked else None,
        "top": [record(c) for c in ranked[: settings.top_k]],
        "pareto": [space.arch_id(c.arch) for c in pareto_front(children)],
        "children": [record(c) for c in children],
    }


# --- supernet scoring (nasfast evaluate's code) ----------------------------------------------------
class SupernetScorer:
    """Inherited-weight dev MLM loss of children, as ``nasfast evaluate`` computes it."""

    def __init__(self, run, dev_batches: Optional[int] = None):
        self.run = run
        self.dev = run.dev_batches(dev_batches)
        self._model = None

    def protocol(self) -> dict:
        from nasfast.analysis.runs import dev_description
        from nasfast.data.blocks import data_fingerprint
        from nasfast.files import file_sha1
        from nasfast.training.checkpointer import CHECKPOINT

        ckpt = self.run.path / CHECKPOINT
        if not ckpt.is_file():
            raise UserError(f"run {self.run.path} has no checkpoint at {ckpt}")
        return {"version": CACHE_VERSION, "checkpoint_sha1": file_sha1(ckpt),
                "data_sha1": data_fingerprint(self.run.path / "data"), "dev": dev_description(self.run, self.dev)}

    def __call__(self, archs: list) -> list:
        from nasfast.space.evaluation import evaluate_child

        if self._model is None:  # loaded only when something is not cached
            self._model = self.run.supernet()
        results = []
        for arch in archs:
            r = evaluate_child(self._model, arch, self.dev, self.run.device)
            results.append({"score": r["loss"], **r})
        return results


def run_cost(run) -> Cost:
    """Exact (params, FLOPs per sequence of data.block_size tokens) of a run's children."""
    from nasfast.space.supernet import child_forward_flops, child_num_params

    vocab, max_len, T = run.corpus.vocab_size, run.cfg.model.max_len, run.cfg.data.block_size
    return lambda arch: (child_num_params(run.space, arch, vocab, max_len), child_forward_flops(run.space, arch, vocab, T))


def search_run(run, budget: Budget, settings: SearchSettings, out: Path, dev_batches: Optional[int] = None,
               progress: bool = True) -> dict:
    """Search a run's space with its supernet; write OUT/search.json and OUT/search.png."""
    out = Path(out)
    scorer = SupernetScorer(run, dev_batches)
    cache = ScoreCache(out / "cache", scorer.protocol())
    result = run_search(run.space, budget, run_cost(run), scorer, settings, cache, progress)
    result.update(run=str(run.path), sampler=run.cfg.sampler.name, score="inherited-weight dev MLM loss (nats)",
                  flops_per="sequence of %d tokens" % run.cfg.data.block_size, protocol=cache.protocol)
    atomic_write_text(out / "search.json", json.dumps(result, indent=2))
    from nasfast.nas.search_plot import plot_search

    plot_search(out / "search.png", result)
    return result


def __getattr__(name: str):
    """``Sampler`` was this module's name for ``BudgetSampler`` (and clashed with nasfast.space.samplers.Sampler);
    importable with a warning until 0.3."""
    from nasfast._moved import renamed

    if name in ("search_figure", "plot_search"):  # moved to nasfast.nas.search_plot; still found here
        from nasfast.nas import search_plot

        return getattr(search_plot, name)
    return renamed(__name__, {"Sampler": "BudgetSampler"}, name)
