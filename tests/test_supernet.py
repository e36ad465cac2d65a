import random

import pytest
import torch

from nasfast.config import ModelConfig
from nasfast.space.supernet import Supernet
from nasfast.training.optim import build_optimizer


def make_net(space, dropout=0.0, vocab=97):
    torch.manual_seed(0)
    return Supernet(ModelConfig(hidden=24, max_len=32, dropout=dropout), space, vocab_size=vocab)


def test_forward_shapes_and_masked_head(micro_space):
    net = make_net(micro_space).eval()
    ids = torch.randint(5, 97, (3, 17))
    arch = micro_space.random_arch(random.Random(0))
    out = net(ids, torch.ones_like(ids), arch)
    assert out.logits.shape == (3, 17, 97)
    assert len(out.hidden_states) == 3 and all(h.shape == (3, 17, 24) for h in out.hidden_states)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[2, 9] = 7, 11
    masked = net(ids, torch.ones_like(ids), arch, labels)
    assert masked.logits.shape == (2, 97) and masked.num_masked == 2
    # the masked-only head computes the same logits as the full head at those positions
    torch.testing.assert_close(masked.logits, out.logits[labels != -100])
    expected = torch.nn.functional.cross_entropy(out.logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(masked.loss, expected)


@pytest.mark.parametrize("cand", ["mha:2", "mha:3", "conv:3", "conv:5"])
def test_padding_does_not_leak(micro_space, cand):
    """Changing the tokens at padded positions must not change any real position's output."""
    net = make_net(micro_space).eval()
    c = micro_space.names.index(cand)
    arch = (c, c, c)
    ids = torch.randint(5, 97, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[1, 1:] = 0
    other = ids.clone()
    other[mask == 0] = torch.randint(5, 97, (int((mask == 0).sum()),))
    a = net(ids, mask, arch).hidden_states[-1]
    b = net(other, mask, arch).hidden_states[-1]
    real = mask.bool()
    assert not torch.equal(ids, other)
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    assert torch.isfinite(a).all()


def test_extract_computes_the_same_function(micro_space):
    net = make_net(micro_space, dropout=0.1).eval()
    rng = random.Random(5)
    ids = torch.randint(5, 97, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    for _ in range(5):
        arch = micro_space.random_arch(rng)
        static = net.extract(arch)
        a, b = net(ids, mask, arch, labels), static(ids, mask, labels)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        # copies, not views: training the static model leaves the supernet alone
        before = [p.clone() for p in net.parameters()]
        next(static.parameters()).data.add_(1.0)
        assert all(torch.equal(x, y) for x, y in zip(before, net.parameters()))


def test_only_the_sampled_child_is_updated(micro_space):
    """Candidates outside the step's child keep weights and AdamW state bit-for-bit."""
    from nasfast.config import Config

    net = make_net(micro_space, dropout=0.1)
    opt = build_optimizer(net, Config())
    ids = torch.randint(5, 97, (4, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    first, second = (0, 2, 3), (1, 2, 5)  # layer 1 shares ffn:40; layers 0 and 2 differ
    for arch in (first, second):
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters() if p in opt.state}
        net(ids, None, arch, labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        used = {id(p) for p in net.child_parameters(arch)}
        for n, p in net.named_parameters():
            if id(p) in used:
                continue
            assert torch.equal(p, before[n]), n
            if n in state_before:
                assert all(torch.equal(opt.state[p][k], v) for k, v in state_before[n].items()), n
            else:
                assert p not in opt.state or not opt.state[p], n
        changed = [n for n, p in net.named_parameters() if id(p) in used and not torch.equal(p, before[n])]
        assert any(n.startswith(f"layers.0.{arch[0]}.") for n in changed)


def test_extract_matches_in_training_mode_with_layer_seeds(micro_space):
    """Same dropout draws per layer: a static child trains exactly like the supernet running it."""
    net = make_net(micro_space, dropout=0.2).train()
    arch = (1, 4, 2)
    static = net.extract(arch)
    ids = torch.randint(5, 97, (2, 15))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    a = net(ids, None, arch, labels, layer_seed=5)
    b = static(ids, None, labels, layer_seed=5)
    assert torch.equal(a.loss, b.loss)
    c = static(ids, None, labels, layer_seed=6)
    assert not torch.equal(a.loss, c.loss)


def test_forward_leaves_the_callers_rng_untouched(micro_space):
    """Dropout is reseeded per layer inside forward; the caller's global RNG stream must not move."""
    net = make_net(micro_space, dropout=0.2).train()
    ids = torch.randint(1, 97, (3, 11))
    arch = tuple(range(micro_space.num_layers))
    static = net.extract(arch)
    for call in (lambda: net(ids, None, arch, layer_seed=123), lambda: static(ids, None, layer_seed=123)):
        torch.manual_seed(7)
        expected = torch.rand(5)
        torch.manual_seed(7)
        call()
        assert torch.equal(torch.rand(5), expected)
    # and the dropout draws themselves are still a pure function of the layer seed
    a = net(ids, None, arch, layer_seed=5).hidden_states[-1]
    b = net(ids, None, arch, layer_seed=5).hidden_states[-1]
    assert torch.equal(a, b)
