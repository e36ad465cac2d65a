import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nasfast.config import ModelConfig
from nasfast.errors import UserError
from nasfast.space.searchspace import Candidate, SearchSpace, hamming
from nasfast.space.supernet import StaticModel, Supernet, child_forward_flops, child_num_params


def test_candidate_parse_round_trip():
    for name in ["mha:4", "ffn:512", "conv:7", "identity"]:
        assert Candidate.parse(name).name == name


@pytest.mark.parametrize("bad", ["mha", "ffn:x", "conv:4", "attn:4", "mha:0", "mha:-2", ""])
def test_candidate_parse_rejects(bad):
    with pytest.raises(UserError):
        Candidate.parse(bad)


def test_space_rejects_heads_that_do_not_divide_hidden():
    with pytest.raises(UserError, match="not divisible"):
        SearchSpace.from_names(2, ["mha:5"], 24)


def test_arch_id_parse_round_trip_and_errors(micro_space):
    rng = random.Random(0)
    for _ in range(20):
        arch = micro_space.random_arch(rng)
        assert micro_space.parse(micro_space.arch_id(arch)) == arch
    with pytest.raises(UserError, match="layers"):
        micro_space.parse("mha:2|ffn:40")
    with pytest.raises(UserError, match="not in the space"):
        micro_space.parse("mha:2|ffn:41|identity")
    with pytest.raises(UserError):
        micro_space.validate((0, 1, 99))


def test_hamming_and_size(micro_space):
    assert hamming((0, 1, 2), (0, 1, 2)) == 0
    assert hamming((0, 1, 2), (1, 1, 3)) == 2
    assert micro_space.size == 6**3


def test_random_children_cover_every_candidate(micro_space):
    rng = random.Random(1)
    seen = {(l, c) for _ in range(400) for l, c in enumerate(micro_space.random_arch(rng))}
    assert len(seen) == 3 * 6


def test_largest_smallest(micro_space):
    assert micro_space.arch_id(micro_space.smallest()) == "identity|identity|identity"
    largest = micro_space.largest()
    rng = random.Random(2)
    for _ in range(50):
        assert micro_space.layer_params(micro_space.random_arch(rng)) <= micro_space.layer_params(largest)


def test_param_counts_match_extracted_static_model(micro_space):
    cfg = ModelConfig(hidden=24, max_len=32)
    net = Supernet(cfg, micro_space, vocab_size=97)
    rng = random.Random(3)
    for _ in range(10):
        arch = micro_space.random_arch(rng)
        static = net.extract(arch)
        counted = sum(p.numel() for p in static.parameters())  # tied decoder counted once
        assert child_num_params(micro_space, arch, 97, 32) == counted


def test_flop_counts_match_torch_flop_counter(micro_space):
    cfg = ModelConfig(hidden=24, max_len=32, dropout=0.0)
    rng = random.Random(4)
    for _ in range(6):
        arch = micro_space.random_arch(rng)
        model = StaticModel(cfg, micro_space, arch, vocab_size=97).eval()
        ids = torch.randint(0, 97, (1, 19))
        with FlopCounterMode(display=False) as counter:
            model(ids, None)
        assert counter.get_total_flops() == child_forward_flops(micro_space, arch, 97, 19)
