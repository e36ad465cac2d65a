"""Reference children and anchors that mean something (issue 29, class 7).

The largest child by parameters alone is often all-FFN: no layer mixes positions, so it learns only
unigram statistics. References (summary.json, ``nasfast space``) and MAGIC-A's drawn anchors must be
children *with context*; the space's cost range is exact without enumerating it.
"""
from __future__ import annotations

import itertools
import random

import pytest

from nasfast.space.alignment import AnchorTracker
from nasfast.space.evaluation import reference_children, representative_children
from nasfast.space.searchspace import SearchSpace
from nasfast.space.supernet import child_forward_flops, child_num_params, space_cost_range
from tests.runhelpers import cli

TINY = ["mha:2", "mha:4", "ffn:256", "ffn:512", "conv:3", "conv:7", "identity"]  # configs/tiny.yaml's kinds
VOCAB, MAX_LEN, T = 300, 64, 48


def tiny_space(layers: int = 3) -> SearchSpace:
    return SearchSpace.from_names(layers, TINY, 64)


def all_children(space: SearchSpace):
    return itertools.product(range(len(space.candidates)), repeat=space.num_layers)


def test_references_have_context_and_are_the_extremes_among_those():
    space = tiny_space()
    assert not space.has_context(space.largest())  # the fault: the old "largest" is all ffn:512
    refs = reference_children(space)
    assert list(refs) == ["largest_with_context", "smallest_with_context", "smallest"]
    with_context = [a for a in all_children(space) if space.has_context(a)]
    params = space.layer_params
    assert params(refs["largest_with_context"]) == max(map(params, with_context))
    assert params(refs["smallest_with_context"]) == min(map(params, with_context))
    assert space.has_context(refs["largest_with_context"]) and space.has_context(refs["smallest_with_context"])
    assert space.arch_id(refs["smallest"]) == "identity|identity|identity"
    assert set(refs).isdisjoint(n for n in representative_children(space, 2) if n.startswith("random"))


def test_references_without_duplicates_and_without_mixing_candidates():
    mha_only = SearchSpace.from_names(2, ["mha:2", "identity"], 16)
    assert reference_children(mha_only) == {"largest_with_context": (0, 0), "smallest_with_context": (0, 1),
                                            "smallest": (1, 1)}
    conv_only = SearchSpace.from_names(2, ["conv:3"], 16)  # every reference is the same child: listed once
    assert reference_children(conv_only) == {"largest_with_context": (0, 0)}
    no_context = SearchSpace.from_names(2, ["ffn:8", "identity"], 16)
    assert reference_children(no_context) == {"largest": (0, 0), "smallest": (1, 1)}


def test_cost_range_is_exact_without_enumerating():
    space = tiny_space()
    span = space_cost_range(space, VOCAB, MAX_LEN, T)
    params = [child_num_params(space, a, VOCAB, MAX_LEN) for a in all_children(space)]
    flops = [child_forward_flops(space, a, VOCAB, T) for a in all_children(space)]
    assert span == {"params": [min(params), max(params)], "flops_per_sequence": [min(flops), max(flops)]}
    huge = tiny_space(layers=600)  # 7^600 children: closed form, instant
    assert space_cost_range(huge, VOCAB, MAX_LEN, T)["params"][1] > span["params"][1]


@pytest.mark.parametrize("init", ["largest", "random", "best:4"])
def test_anchor_init_never_starts_from_a_context_free_child(init):
    space = SearchSpace.from_names(2, ["ffn:16", "identity", "conv:3"], 16)  # 4/9 of the children lack context
    for seed in range(30):
        tracker = AnchorTracker(space, init, seed=seed, every=1, warmup=0, score=lambda archs: [0.0] * len(archs))
        assert space.has_context(tracker.anchor_for(0)), (init, seed, tracker.anchor)


def test_random_with_context_keeps_the_draws_that_already_have_context():
    space = tiny_space()
    a, b = random.Random(5), random.Random(5)
    for _ in range(50):
        drawn = space.random_arch(a)
        if space.has_context(drawn):  # redraws only change the context-free draws
            assert space.random_arch_with_context(b) == drawn
            break


@pytest.mark.slow
def test_space_command_prints_labelled_references_and_range(micro_yaml):
    tiny = ["--set", "space.candidates=[mha:2, ffn:512, conv:3, identity]"]
    res = cli("space", "--config", micro_yaml, *tiny)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1].startswith("range over all children: params ") and " .. " in lines[1]
    assert lines[2].startswith("largest_with_context: mha:2|ffn:512|ffn:512 ")
    assert lines[3].startswith("smallest_with_context: conv:3|identity|identity ")
    assert lines[4].startswith("smallest: identity|identity|identity ")


@pytest.mark.slow
def test_context_free_fixed_anchor_warns(micro_yaml):
    res = cli("space", "--config", micro_yaml, "--set", "sampler.name=magic-a", "--set", "data.anchor_blocks=4",
              "--set", "align.anchor_init=ffn:40|identity|ffn:40")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("warning:") == 1 and "no attention or convolution" in res.stderr, res.stderr
