"""MAGIC-T sampler, MAGIC-A alignment and anchor tracking, MAGIC resume."""
import random

import pytest
import torch

from nasfast.alignment import AnchorTracker, aligned_forward, first_difference
from nasfast.checkpoint import load
from nasfast.config import ModelConfig
from nasfast.metrics import read_metrics
from nasfast.samplers import build_sampler
from nasfast.space import hamming
from nasfast.supernet import Supernet
from nasfast.trainer import CHECKPOINT, Trainer


@pytest.mark.parametrize("k", [1, 2, 3])
def test_magic_t_changes_exactly_k_layers(micro_space, k):
    sampler = build_sampler("magic-t", micro_space, seed=5, k=k)
    children = [sampler.sample(s) for s in range(300)]
    assert all(hamming(a, b) == k for a, b in zip(children, children[1:]))
    # a pure function of (seed, step): a fresh sampler asked out of order agrees
    fresh = build_sampler("magic-t", micro_space, seed=5, k=k)
    for s in (250, 17, 299, 0):
        assert fresh.sample(s) == children[s]
    other = build_sampler("magic-t", micro_space, seed=6, k=k)
    assert [other.sample(s) for s in range(20)] != children[:20]


def test_magic_t_visits_every_candidate_at_every_layer(micro_space):
    sampler = build_sampler("magic", micro_space, seed=0)
    seen = {(l, c) for s in range(600) for l, c in enumerate(sampler.sample(s))}
    assert len(seen) == micro_space.num_layers * len(micro_space.candidates)


def test_sampler_state_round_trip(micro_space):
    a = build_sampler("magic-t", micro_space, seed=1)
    a.sample(40)
    b = build_sampler("magic-t", micro_space, seed=1)
    b.load_state_dict(a.state_dict())
    assert [b.sample(s) for s in range(41, 60)] == [a.sample(s) for s in range(41, 60)]


def make(space, dropout=0.1):
    torch.manual_seed(0)
    return Supernet(ModelConfig(hidden=24, max_len=32, dropout=dropout), space, vocab_size=97).train()


def batch_for(seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 15:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_alignment_zero_when_child_is_anchor(micro_space):
    net = make(micro_space)
    arch = (0, 2, 3)
    for sharing in (True, False):
        out = aligned_forward(net, batch_for(), arch, arch, layer_seed=11, prefix_sharing=sharing)
        assert out.align_loss.item() == 0.0
        net.zero_grad(set_to_none=True)
        (out.align_loss + 0 * out.mlm_loss).backward()
        assert all(p.grad is None or not p.grad.any() for p in net.parameters())


def test_anchor_gets_no_gradient_from_alignment(micro_space):
    net = make(micro_space)
    child, anchor = (0, 2, 3), (1, 2, 4)  # layer 1 shared, layers 0 and 2 anchor-only candidates
    out = aligned_forward(net, batch_for(), child, anchor, layer_seed=3)
    assert out.align_loss.item() > 0
    net.zero_grad(set_to_none=True)
    out.align_loss.backward()
    for layer, cand in ((0, 1), (2, 4)):
        assert all(p.grad is None for p in net.layers[layer][cand].parameters())
    assert net.layers[0][0].qkv.weight.grad.abs().sum() > 0  # the child's own candidates do get it
    # anchor hidden states were computed under no_grad: changing λ scales only the child's gradient
    assert all(p.grad is None for l, c in ((0, 1), (2, 4)) for p in net.layers[l][c].parameters())


@pytest.mark.parametrize("child,anchor", [((0, 2, 3), (0, 2, 4)), ((0, 2, 3), (0, 5, 3)), ((3, 1, 4), (2, 1, 4))])
def test_prefix_sharing_equals_naive_two_forward(micro_space, child, anchor):
    batch = batch_for(1)
    results = []
    for sharing in (True, False):
        net = make(micro_space, dropout=0.1)
        out = aligned_forward(net, batch, child, anchor, layer_seed=7, prefix_sharing=sharing)
        (out.mlm_loss + 0.5 * out.align_loss).backward()
        results.append((out.mlm_loss.detach(), out.align_loss.detach(), grads(net)))
    (ma, aa, ga), (mb, ab, gb) = results
    assert torch.equal(ma, mb) and torch.equal(aa, ab) and aa > 0
    assert first_difference(child, anchor) == next(i for i in range(3) if child[i] != anchor[i])
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            assert torch.equal(ga[name], gb[name]), name


def test_anchor_tracker_caches_score_and_keeps_the_best(micro_space):
    calls = []
    scores = {}

    def score(arch):
        calls.append(arch)
        return scores.setdefault(arch, random.Random(str(arch)).random())

    tracker = AnchorTracker(micro_space, "largest", seed=0, every=2, score=score)
    rng = random.Random(0)
    for step in range(40):
        child = micro_space.random_arch(rng)
        before = tracker.anchor
        info = tracker.maybe_update(step, child)
        if info["anchor_changed"]:
            assert scores[child] < scores[before] and tracker.anchor == child
        if tracker.score is not None:
            assert tracker.score == scores[tracker.anchor]
    assert calls.count(micro_space.largest()) == 1  # the anchor's own score is never recomputed
    assert len(calls) == 1 + 20  # one challenge every 2 steps
    assert tracker.anchor != micro_space.largest()


def test_magic_resume_is_bitwise_identical(micro_config, tmp_path):
    micro_config.sampler.name = "magic"
    micro_config.sampler.anchor_every = 1
    micro_config.sampler.anchor_init = "random"
    micro_config.sampler.align_weight = 0.5
    Trainer(micro_config, tmp_path / "a", progress=False).train()
    Trainer(micro_config, tmp_path / "b", progress=False, stop_after=3).train()
    Trainer(micro_config, tmp_path / "b", resume=True, progress=False).train()
    a, b = load(tmp_path / "a" / CHECKPOINT), load(tmp_path / "b" / CHECKPOINT)
    assert all(torch.equal(t, b["model"][n]) for n, t in a["model"].items())
    assert a["anchor"] == b["anchor"] and a["sampler"] == b["sampler"]
    ra, rb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    keys = ("step", "loss", "child", "align_loss", "anchor", "anchor_score", "anchor_changed")
    assert [tuple(r.get(k) for k in keys) for r in ra] == [tuple(r.get(k) for k in keys) for r in rb]
    assert all("align_loss" in r and "anchor" in r for r in ra)
    children = [r["child"] for r in ra]  # consecutive MAGIC children differ in exactly one layer
    assert all(sum(x != y for x, y in zip(p.split("|"), q.split("|"))) == 1 for p, q in zip(children, children[1:]))
