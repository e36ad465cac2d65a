"""MAGIC-T sampler, MAGIC-A alignment and anchor tracking, MAGIC resume."""
import random

import pytest
import torch

from nasfast.config import ModelConfig
from nasfast.space.alignment import AnchorTracker, aligned_forward, first_difference
from nasfast.space.samplers import build_sampler
from nasfast.space.searchspace import hamming
from nasfast.space.supernet import Supernet
from nasfast.training.checkpointer import CHECKPOINT
from nasfast.training.checkpointer import raw_checkpoint as load
from nasfast.training.metrics import read_metrics
from nasfast.training.trainer import Trainer


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


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_bf16_anchor_rounds_only_the_target(micro_space, backend):
    """align.anchor_precision=bf16: the child's forward and MLM loss are untouched (bitwise), the target
    is the fp32 anchor's up to bf16 rounding, and the anchor still gets no gradient."""
    if backend == "native":
        import nasfast.kernels.native as native

        if not native.available():
            pytest.skip(f"native backend unavailable: {native.why_unavailable()}")
    child, anchor = (0, 2, 3), (1, 2, 4)
    batch = batch_for(2)
    outs = {}
    for bf16 in (False, True):
        net = make(micro_space)
        net.set_backend(backend)
        out = aligned_forward(net, batch, child, anchor, layer_seed=5, anchor_bf16=bf16)
        out.align_loss.backward()
        outs[bf16] = (out, grads(net))
    (f32, g32), (b16, g16) = outs[False], outs[True]
    assert torch.equal(f32.mlm_loss, b16.mlm_loss)
    assert b16.align_loss.dtype == torch.float32 and b16.align_loss != f32.align_loss  # autocast did run
    torch.testing.assert_close(b16.align_loss, f32.align_loss, rtol=5e-2, atol=0)
    for name, g in g32.items():
        assert (g is None) == (g16[name] is None), name
        if g is not None:  # d(align)/d(child) = 2 (h - target) / n: only the target moved, by bf16 rounding
            torch.testing.assert_close(g16[name], g, rtol=0.1, atol=0.05 * float(g.abs().max()) + 1e-12)
    for layer, cand in ((0, 1), (2, 4)):
        assert all(g16[n] is None for n, _ in net.layers[layer][cand].named_parameters(
            prefix=f"layers.{layer}.{cand}"))


def test_fp32_anchor_keeps_an_enclosing_bf16_autocast(micro_space):
    """train.bf16 wraps the whole loss in bf16 autocast: the default anchor (anchor_precision=fp32 =
    'the training precision') must run under it too, i.e. give exactly what the explicit bf16 anchor gives."""
    child, anchor = (0, 2, 3), (1, 2, 4)
    batch = batch_for(6)
    losses = []
    for bf16_anchor in (False, True):
        net = make(micro_space)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(aligned_forward(net, batch, child, anchor, layer_seed=9, anchor_bf16=bf16_anchor).align_loss)
    assert torch.equal(losses[0], losses[1])


def test_anchor_precision_is_checked(micro_config):
    from nasfast.errors import UserError
    from nasfast.space.checks import check_config

    micro_config.align.anchor_precision = "fp8"
    with pytest.raises(UserError, match="align.anchor_precision must be fp32 or bf16"):
        check_config(micro_config)


class DriftingScores:
    """Child quality q(arch) is fixed, but every score also falls as the supernet trains (a drift per
    optimizer step), as dev losses do. A score cached at install time goes stale under this drift."""

    def __init__(self):
        self.version = 0  # bumped once per training step: the "weights"
        self.calls: list[tuple[int, tuple]] = []

    def quality(self, arch) -> float:
        return random.Random(str(arch)).random()

    def __call__(self, archs):
        self.calls.append((self.version, tuple(archs)))
        return [self.quality(a) - 0.05 * self.version for a in archs]


def test_anchor_challenge_scores_anchor_and_child_on_the_same_weights(micro_space):
    scores = DriftingScores()
    tracker = AnchorTracker(micro_space, "random", seed=0, every=2, warmup=0, score=scores)
    rng = random.Random(0)
    for step in range(60):
        child = micro_space.random_arch(rng)
        assert tracker.anchor_for(step) is not None
        before = tracker.anchor
        info = tracker.maybe_update(step, child)
        scores.version += 1
        if (step + 1) % 2 == 0 and child != before:
            version, archs = scores.calls[-1]
            assert archs == (before, child) and version == step  # both scored in one call, same weights
            # the anchor is the better of the two by true quality: drift cannot let a worse child win
            winner = min((before, child), key=scores.quality)
            assert tracker.anchor == winner and info["anchor_changed"] == (winner == child)
    assert tracker.challenges == 30 and 0 < tracker.replacements < 30


def test_anchor_warmup_then_best_of_n(micro_space):
    scores = DriftingScores()
    tracker = AnchorTracker(micro_space, "best:6", seed=3, every=5, warmup=4, score=scores)
    for step in range(4):
        assert tracker.anchor_for(step) is None
        assert tracker.maybe_update(step, micro_space.largest())["anchor"] is None
    anchor = tracker.anchor_for(4)
    version, pool = scores.calls[-1]
    assert len(pool) == 6 and anchor == min(pool, key=scores.quality)
    # challenges count from the end of the warm-up: the first one after step 4 + 5
    n = len(scores.calls)
    for step in range(4, 9):
        tracker.maybe_update(step, micro_space.smallest())
    assert len(scores.calls) == n + 1
    # state round-trip
    other = AnchorTracker(micro_space, "best:6", seed=3, every=5, warmup=4, score=scores)
    other.load_state_dict(tracker.state_dict())
    assert other.anchor_for(9) == tracker.anchor_for(9) and other.challenges == tracker.challenges


def test_anchor_split_is_disjoint_from_evaluation_dev(micro_config, tmp_path):
    from nasfast.data.blocks import build_corpus

    micro_config.data.anchor_blocks = 5
    corpus = build_corpus(micro_config.data)
    assert len(corpus.dev_blocks) == micro_config.data.dev_blocks - 5 and len(corpus.anchor_blocks) == 5
    dev = {bytes(b) for b in corpus.dev_blocks}
    assert not any(bytes(b) in dev for b in corpus.anchor_blocks)
    assert not any(bytes(b) in {bytes(t) for t in corpus.train_blocks} for b in corpus.anchor_blocks)
    batches = corpus.anchor_batches(2)
    assert sum(len(b["input_ids"]) for b in batches) == 5
    assert torch.equal(batches[0]["labels"], corpus.anchor_batches(2)[0]["labels"])  # fixed masks


def test_magic_a_requires_an_anchor_split(micro_config):
    from conftest import MICRO_OVERRIDES

    from nasfast.errors import UserError
    from nasfast.space.checks import load_run_config

    with pytest.raises(UserError, match="data.anchor_blocks"):
        load_run_config(None, MICRO_OVERRIDES + ["sampler.name=magic-a"])
    with pytest.raises(UserError, match="anchor_dev_batches' was removed"):
        load_run_config(None, MICRO_OVERRIDES + ["sampler.anchor_dev_batches=2"])
    with pytest.raises(UserError, match="best:N"):
        load_run_config(None, MICRO_OVERRIDES + ["align.anchor_init=best:x"])
    load_run_config(None, MICRO_OVERRIDES + ["sampler.name=magic-a", "data.anchor_blocks=4"])



def test_magic_a_keys_moved_to_the_align_section(tmp_path, capsys):
    """Old ``sampler.*`` MAGIC-A keys still load (saved run folders resume) and say where they went."""
    import yaml
    from conftest import MICRO_OVERRIDES

    from nasfast.config import load_config, migrate
    from nasfast.errors import UserError
    from nasfast.training.runfolder import check_resume_changes

    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"sampler": {"name": "magic-a", "align_weight": 0.37, "anchor_every": 3}}))
    cfg = load_config(old, MICRO_OVERRIDES + ["data.anchor_blocks=4"])
    assert (cfg.align.weight, cfg.align.anchor_every) == (0.37, 3)
    assert "'sampler.align_weight' is deprecated, use 'align.weight'" in capsys.readouterr().err
    # a checkpoint's config dict written before the move compares equal, and a real change is still caught
    saved = cfg.to_dict()
    saved["sampler"]["align_weight"] = saved.pop("align")["weight"]
    check_resume_changes(saved, cfg)
    assert migrate(saved)["align"]["weight"] == 0.37
    saved["sampler"]["align_weight"] = 0.5
    with pytest.raises(UserError, match="align.weight"):
        check_resume_changes(saved, cfg)

def test_trainer_anchor_uses_the_anchor_split(micro_config, tmp_path):
    micro_config.sampler.name = "magic-a"
    micro_config.data.anchor_blocks = 4
    micro_config.align.anchor_warmup = 2
    micro_config.align.anchor_every = 2
    trainer = Trainer(micro_config, tmp_path / "r", progress=False)
    seen = []
    score = trainer.anchor.score_fn
    trainer.anchor.score_fn = lambda archs: seen.append(list(archs)) or score(archs)
    trainer.train()
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["anchor"] is None for r in rows[:2]] == [True, True] and all(r["anchor"] for r in rows[2:])
    assert len(seen[0]) == 8  # best:8 picks the initial anchor once, after the warm-up
    assert all(len(c) == 2 for c in seen[1:]) and len(seen) >= 2
    assert {bytes(b) for b in trainer.corpus.anchor_blocks}.isdisjoint({bytes(b) for b in trainer.corpus.dev_blocks})


def test_balanced_walk_one_change_per_step_and_even_coverage(micro_space):
    steps = 1200
    balanced = build_sampler("magic-t", micro_space, seed=2, walk="balanced")
    uniform = build_sampler("magic-t", micro_space, seed=2)
    counts = {}
    for name, sampler in (("balanced", balanced), ("uniform", uniform)):
        children = [sampler.sample(s) for s in range(steps)]
        assert all(hamming(a, b) == 1 for a, b in zip(children, children[1:]))
        c = [[0] * len(micro_space.candidates) for _ in range(micro_space.num_layers)]
        for child in children:
            for layer, cand in enumerate(child):
                c[layer][cand] += 1
        counts[name] = [x for row in c for x in row]
    even = steps / len(micro_space.candidates)
    # every (layer, candidate) within 10% of an even share (the bound: a visit lasts 1..2L-1 steps)
    assert max(abs(x - even) for x in counts["balanced"]) <= 0.1 * even
    assert max(counts["balanced"]) / min(counts["balanced"]) < max(counts["uniform"]) / min(counts["uniform"])
    # still a pure function of (seed, step), and the state survives a checkpoint
    fresh = build_sampler("magic-t", micro_space, seed=2, walk="balanced")
    assert [fresh.sample(s) for s in (700, 5, 1199)] == [balanced.sample(s) for s in (700, 5, 1199)]
    resumed = build_sampler("magic-t", micro_space, seed=2, walk="balanced")
    balanced.sample(300)
    resumed.load_state_dict(balanced.state_dict())
    assert [resumed.sample(s) for s in range(301, 340)] == [balanced.sample(s) for s in range(301, 340)]
    # not a short cycle: the walk reaches (nearly) every child of the 216-child space
    assert len({balanced.sample(s) for s in range(steps)}) > 0.9 * micro_space.size


def test_balanced_walk_with_k_changes_k_layers(micro_space):
    sampler = build_sampler("magic-t", micro_space, seed=4, k=2, walk="balanced")
    children = [sampler.sample(s) for s in range(200)]
    assert all(hamming(a, b) == 2 for a, b in zip(children, children[1:]))


def test_magic_resume_is_bitwise_identical(micro_config, tmp_path):
    micro_config.sampler.name = "magic"
    micro_config.align.anchor_every = 1
    micro_config.align.anchor_init = "random"
    micro_config.align.weight = 0.5
    micro_config.data.anchor_blocks = 4
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
