"""Search under a budget: feasibility, finding a known optimum, cache/resume, the command on a micro run."""
import itertools
import json
import random

import pytest
import torch
from conftest import MICRO_OVERRIDES

from nasfast.analysis.runs import open_run
from nasfast.cli.app import main
from nasfast.config import load_config
from nasfast.errors import UserError
from nasfast.nas.search import Budget, Child, ScoreCache, SearchSettings, pareto_front, run_search
from nasfast.space.searchspace import SearchSpace
from nasfast.space.supernet import child_forward_flops, child_num_params
from nasfast.training.trainer import Trainer

# 6 layers x 5 candidates = 15,625 children: small enough to enumerate for the true optimum, large
# enough that a few hundred random draws rarely hit it.
SPACE = SearchSpace.from_names(6, ["mha:2", "ffn:32", "ffn:64", "conv:3", "identity"], 16)
VOCAB, T = 100, 16


def cost(arch):
    return child_num_params(SPACE, arch, VOCAB, T), child_forward_flops(SPACE, arch, VOCAB, T)


class Separable:
    """Score = sum of a random per-(layer, candidate) value; bigger candidates tend to score better, so
    the constrained optimum sits at the budget's edge (as with real losses). Counts its evaluations."""

    def __init__(self, seed):
        rng = random.Random(seed)
        self.value = [[-SPACE.candidates[c].num_params(SPACE.hidden) / 1000 * rng.uniform(0.5, 1.5) + rng.uniform(0, 1)
                       for c in range(len(SPACE.candidates))] for _ in range(SPACE.num_layers)]
        self.calls = 0

    def score(self, arch):
        return sum(self.value[l][c] for l, c in enumerate(arch))

    def __call__(self, archs):
        self.calls += len(archs)
        return [{"score": self.score(a)} for a in archs]


def optimum(scorer, budget):
    feasible = [a for a in itertools.product(range(5), repeat=6) if budget.fits(*cost(a))]
    return min(feasible, key=scorer.score), len(feasible)


def test_never_over_budget():
    rng = random.Random(1)
    for trial in range(12):
        budget = Budget(max_params=rng.randint(cost(SPACE.smallest())[0], cost(SPACE.largest())[0]),
                        max_flops=rng.choice([None, rng.randint(cost(SPACE.smallest())[1], cost(SPACE.largest())[1])]))
        settings = SearchSettings(strategy=rng.choice(["evolution", "random"]), population=8, generations=4, seed=trial,
                                  mutation_prob=rng.random(), crossover=rng.random())
        res = run_search(SPACE, budget, cost, Separable(trial), settings, progress=False)
        assert res["children"], res
        for c in res["children"] + res["top"] + [res["best"]]:
            assert c["params"] <= budget.max_params and (budget.max_flops is None or c["flops"] <= budget.max_flops)
            assert (c["params"], c["flops"]) == cost(SPACE.parse(c["arch"]))
        ids = [c["arch"] for c in res["children"]]
        assert len(ids) == len(set(ids)) == min(32, len(ids))  # distinct, P x G unless the space ran out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evolution_finds_the_known_optimum(seed):
    scorer = Separable(100 + seed)
    budget = Budget(max_params=cost((1, 1, 2, 2, 4, 4))[0])  # binds: the largest child is far over it
    best, feasible = optimum(scorer, budget)
    assert 1000 < feasible < SPACE.size
    settings = SearchSettings(population=16, generations=16, seed=seed)
    res = run_search(SPACE, budget, cost, scorer, settings, progress=False)
    assert res["best"]["arch"] == SPACE.arch_id(best)
    assert res["best"]["score"] == pytest.approx(scorer.score(best))
    assert res["evaluations"]["computed"] == scorer.calls == 256  # the evaluation budget, and only new children
    rand = run_search(SPACE, budget, cost, Separable(100 + seed), SearchSettings(strategy="random", population=16,
                      generations=16, seed=seed), progress=False)
    assert rand["evaluations"]["total"] == 256 and rand["best"]["score"] >= res["best"]["score"]


def test_exhausting_a_tiny_space_stops_without_duplicates():
    space = SearchSpace.from_names(2, ["ffn:8", "identity"], 8)
    c = lambda a: (child_num_params(space, a, 50, 8), 0)  # noqa: E731
    budget = Budget(max_params=c((0, 1))[0])  # 3 of the 4 children fit
    res = run_search(space, budget, c, lambda archs: [{"score": float(sum(a))} for a in archs],
                     SearchSettings(population=2, generations=5), progress=False)
    assert sorted(ch["arch"] for ch in res["children"]) == sorted(["ffn:8|identity", "identity|ffn:8", "identity|identity"])
    assert res["evaluations"]["exhausted"] and res["best"]["arch"] == "ffn:8|identity"  # ties broken by arch


def test_infeasible_budget_and_bad_settings():
    with pytest.raises(UserError, match="no child fits"):
        run_search(SPACE, Budget(max_params=10), cost, Separable(0), SearchSettings(), progress=False)
    with pytest.raises(UserError, match="budget"):
        Budget()
    for bad in ({"population": 1}, {"generations": 0}, {"mutation_prob": 1.5}, {"crossover": -0.1}, {"strategy": "grid"}):
        with pytest.raises(UserError):
            SearchSettings(**bad)


def test_cache_rerun_evaluates_nothing_and_resume_matches(tmp_path):
    budget = Budget(max_params=cost((1, 1, 2, 2, 4, 4))[0])
    settings = SearchSettings(population=8, generations=5, seed=3)
    scorer = Separable(7)
    full = run_search(SPACE, budget, cost, scorer, settings, ScoreCache(tmp_path / "a", {"p": 1}), progress=False)
    assert scorer.calls == 40
    again = Separable(7)
    rerun = run_search(SPACE, budget, cost, again, settings, ScoreCache(tmp_path / "a", {"p": 1}), progress=False)
    assert again.calls == 0 and rerun["evaluations"]["cached"] == 40 and rerun["children"] == full["children"]

    class Interrupted(Exception):
        pass

    class Dies(Separable):
        def __call__(self, archs):
            if self.calls >= 17:
                raise Interrupted
            return super().__call__(archs)

    with pytest.raises(Interrupted):
        run_search(SPACE, budget, cost, Dies(7), settings, ScoreCache(tmp_path / "b", {"p": 1}), progress=False)
    rest = Separable(7)
    resumed = run_search(SPACE, budget, cost, rest, settings, ScoreCache(tmp_path / "b", {"p": 1}), progress=False)
    assert rest.calls == 40 - 17 and resumed["children"] == full["children"]
    with pytest.raises(UserError, match="another checkpoint"):  # a cache of another protocol is never mixed in
        run_search(SPACE, budget, cost, Separable(7), settings, ScoreCache(tmp_path / "a", {"p": 2}), progress=False)


def test_pareto_front():
    kids = [Child((i,), 0, "random", p, 0, {"score": s}) for i, (p, s) in enumerate([(10, 5.0), (20, 4.0), (15, 6.0), (30, 4.0), (40, 3.0)])]
    assert [c.params for c in pareto_front(kids)] == [10, 20, 40]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("search")
    Trainer(load_config(None, MICRO_OVERRIDES), root / "run", progress=False).train()
    return root / "run"


def test_search_command_on_a_micro_run(micro_run, tmp_path, capsys):
    run = open_run(micro_run)
    largest = child_num_params(run.space, run.space.largest(), run.corpus.vocab_size, run.cfg.model.max_len)
    smallest = child_num_params(run.space, run.space.smallest(), run.corpus.vocab_size, run.cfg.model.max_len)
    budget = (largest + smallest) // 2
    argv = ["search", "--run", str(micro_run), "--max-params", str(budget), "--population", "4", "--generations", "3",
            "--dev-batches", "1", "--out", str(tmp_path / "s"), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "s" / "search.json").read_text())
    assert (tmp_path / "s" / "search.png").stat().st_size > 0
    assert res["evaluations"] == {**res["evaluations"], "total": 12, "computed": 12, "cached": 0}
    assert all(c["params"] <= budget for c in res["children"])
    assert [c["arch"] for c in res["top"]] == [c["arch"] for c in sorted(res["children"], key=lambda c: (c["score"], c["arch"]))][:5]
    # the score is nasfast evaluate's inherited-weight dev loss
    (tmp_path / "archs.txt").write_text(res["best"]["arch"] + "\n")
    assert main(["evaluate", "--run", str(micro_run), "--archs", str(tmp_path / "archs.txt"), "--dev-batches", "1",
                 "--out", str(tmp_path / "est.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "est.json").read_text())["results"][0]["loss"] == res["best"]["loss"]
    assert main(argv) == 0  # rerun: everything from the cache
    again = json.loads((tmp_path / "s" / "search.json").read_text())
    assert again["evaluations"]["computed"] == 0 and again["children"] == res["children"]
    capsys.readouterr()
    assert main(argv[:3] + ["--max-flops", "1k", "--out", str(tmp_path / "t")]) == 2
    assert "no child fits" in capsys.readouterr().err


def test_a_budget_too_tight_for_rejection_is_met_by_repair():
    budget = Budget(max_params=cost((4, 4, 4, 4, 3, 3))[0])  # identity x4 + two convs: a handful of children
    res = run_search(SPACE, budget, cost, Separable(0), SearchSettings(population=4, generations=3), progress=False)
    feasible = [a for a in itertools.product(range(5), repeat=6) if budget.fits(*cost(a))]
    assert len(res["children"]) == min(12, len(feasible)) and all(c["params"] <= budget.max_params for c in res["children"])


def test_budget_counts_parse():
    import argparse

    from nasfast.cli.nas import count

    assert [count(t) for t in ("1490000", "1.49e6", "1.49M", "500k", "2G", "2.5b")] == [1490000, 1490000, 1490000, 500000, 2 * 10**9, 25 * 10**8]
    for bad in ("", "-5", "1.2.3", "ten", "5x"):
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)
