"""The candidate registry: every kind's exact costs, models and exports made before it still load, and
a kind registered from this file alone trains in a supernet (the one-place claim)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import MICRO_OVERRIDES
from torch.utils.flop_counter import FlopCounterMode

from nasfast.config import ModelConfig, load_config
from nasfast.errors import UserError
from nasfast.space.candidates import CANDIDATES, Candidate, CandidateModule, GatedFeedForward, register_candidate
from nasfast.space.searchspace import SearchSpace
from nasfast.space.supernet import StaticModel, Supernet, child_forward_flops, child_num_params
from nasfast.training.optim import build_optimizer

FIXTURES = Path(__file__).parent / "fixtures"
H = 24
# One example token per registered kind (test_every_kind_has_an_example makes a new kind add one here).
EXAMPLES = ["mha:2", "mha:3", "ffn:40", "geglu:16", "conv:3", "conv:5", "identity"]


# --- a toy kind, registered from this test file only -----------------------------------------------
class LowRankModule(CandidateModule):
    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = torch.nn.Parameter(torch.empty(hidden, rank))
        self.up = torch.nn.Parameter(torch.empty(rank, hidden))

    def init_weights(self, init) -> None:
        init.normal_(self.down, std=self.down.shape[0] ** -0.5)
        init.zeros_(self.up)  # starts as the identity, like a LoRA adapter

    def forward(self, x, token_mask, ops):
        return x + (x @ self.down) @ self.up


@register_candidate
@dataclass(frozen=True)
class LowRank(Candidate):
    """``lowrank:r``: ``x + x A B`` with A: H x r, B: r x H (no LayerNorm, no bias)."""

    kind: ClassVar[str] = "lowrank"
    usage: ClassVar[str] = "lowrank:<rank>"
    rank: int

    def validate(self, hidden: int) -> None:
        if self.rank > hidden:
            raise UserError(f"candidate '{self.name}': rank {self.rank} exceeds the hidden size {hidden}")

    def num_params(self, hidden: int) -> int:
        return 2 * hidden * self.rank

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        return 2 * 2 * seq_len * hidden * self.rank

    def build(self, hidden: int, cfg: ModelConfig) -> torch.nn.Module:
        return LowRankModule(hidden, self.rank)


@pytest.fixture(scope="module", autouse=True)
def _unregister_toy():
    yield
    CANDIDATES.pop("lowrank", None)  # other test files see only the built-in kinds


def test_toy_kind_parses_validates_and_counts():
    cand = Candidate.parse("lowrank:4")
    assert cand == LowRank(4) and cand.name == "lowrank:4"
    with pytest.raises(UserError, match="exceeds the hidden size"):
        SearchSpace.from_names(2, ["lowrank:40"], H)
    module = cand.build(H, ModelConfig(hidden=H))
    assert sum(p.numel() for p in module.parameters()) == cand.num_params(H) == 2 * H * 4


def test_toy_kind_trains_one_supernet_step():
    """Supernet + optimizer directly: the toy is built, initialised by its own hook, and updated."""
    space = SearchSpace.from_names(2, ["lowrank:4", "mha:2", "identity"], H)
    torch.manual_seed(0)
    net = Supernet(ModelConfig(hidden=H, max_len=32, dropout=0.1), space, vocab_size=97).train()
    toy = net.layers[0][0]
    assert isinstance(toy, LowRankModule) and torch.count_nonzero(toy.up) == 0 and toy.down.std() > 0.1
    opt = build_optimizer(net, load_config(None, MICRO_OVERRIDES))
    ids = torch.randint(5, 97, (4, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    mha_before = net.layers[0][1].qkv.weight.detach().clone()
    loss = net(ids, None, (0, 0), labels).loss
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    assert torch.count_nonzero(toy.up) > 0 and torch.count_nonzero(net.layers[1][0].up) > 0
    assert torch.equal(net.layers[0][1].qkv.weight, mha_before)  # not in the child: untouched


def test_toy_kind_trains_through_the_trainer_and_reloads(tmp_path):
    """Config -> space -> supernet -> trainer -> checkpoint -> open_run, with nothing but this file's class."""
    from nasfast.analysis.runs import open_run
    from nasfast.training.trainer import Trainer

    torch.set_num_threads(1)
    overrides = MICRO_OVERRIDES + ["train.steps=2", "train.ckpt_every=2", "train.eval_every=2",
                                   "space.candidates=[lowrank:4, mha:2, identity]"]
    Trainer(load_config(None, overrides), tmp_path / "run", progress=False).train()
    run = open_run(tmp_path / "run")
    assert run.space.names == ["lowrank:4", "mha:2", "identity"]
    net = run.supernet()
    assert isinstance(net.layers[0][0], LowRankModule)
    children = [run.space.parse(r["child"]) for r in _metrics(tmp_path / "run") if "child" in r]
    trained = {(l, c) for arch in children for l, c in enumerate(arch)}
    for layer in range(run.space.num_layers):  # zero-initialised `up` moved exactly where the toy trained
        assert (torch.count_nonzero(net.layers[layer][0].up) > 0) == ((layer, 0) in trained)


def _metrics(run_dir: Path) -> list:
    from nasfast.training.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


# --- every registered kind ------------------------------------------------------------------------
def test_every_kind_has_an_example():
    builtin = {k for k in CANDIDATES if k != "lowrank"}
    assert builtin == {Candidate.parse(t).kind for t in EXAMPLES}


@pytest.mark.parametrize("token", EXAMPLES + ["lowrank:4"])
def test_exact_params_and_flops_of_each_kind(token):
    cand = Candidate.parse(token)
    assert cand.name == token
    torch.manual_seed(0)
    module = cand.build(H, ModelConfig(hidden=H, dropout=0.0)).eval()
    assert sum(p.numel() for p in module.parameters()) == cand.num_params(H)
    from nasfast.kernels.registry import get_ops

    x = torch.randn(1, 19, H)
    with FlopCounterMode(display=False) as counter:
        module(x, None, get_ops("eager", "cpu"))
    assert counter.get_total_flops() == cand.forward_flops(H, 19)


@pytest.mark.parametrize("bad", ["geglu", "geglu:0", "geglu:x", "geglu:4:2", "identity:1", "mha:²", "nope:3"])
def test_bad_tokens_are_one_line_user_errors(bad):
    with pytest.raises(UserError) as err:
        Candidate.parse(bad)
    assert "\n" not in str(err.value) and bad in str(err.value)


def test_register_candidate_refuses_clashes_and_non_candidates():
    with pytest.raises(ValueError, match="already registered"):
        register_candidate(type("Other", (GatedFeedForward,), {"kind": "ffn"}))
    with pytest.raises(TypeError):
        register_candidate(int)


# --- the new built-in kind: geglu ------------------------------------------------------------------
def test_geglu_params_and_flops_match_hand_formulas():
    for d, T in ((16, 19), (64, 7), (5, 1)):
        g = GatedFeedForward(d)
        module = g.build(H, ModelConfig(hidden=H))
        # gate and up: H x d + d bias each; down: d x H + H bias; LayerNorm: 2H
        assert g.num_params(H) == 2 * (H * d + d) + (d * H + H) + 2 * H == sum(p.numel() for p in module.parameters())
        assert g.forward_flops(H, T) == 3 * (2 * T * H * d)  # three projections, 2 FLOPs per multiply-add


def test_geglu_in_a_space_counts_exactly_and_ignores_padding():
    space = SearchSpace.from_names(3, ["geglu:16", "mha:2", "ffn:40", "identity"], H)
    cfg = ModelConfig(hidden=H, max_len=32, dropout=0.0)
    torch.manual_seed(0)
    net = Supernet(cfg, space, vocab_size=97).eval()
    arch = (0, 1, 0)
    static = net.extract(arch)
    assert sum(p.numel() for p in static.parameters()) == child_num_params(space, arch, 97, 32)
    ids = torch.randint(0, 97, (1, 19))
    with FlopCounterMode(display=False) as counter:
        StaticModel(cfg, space, arch, vocab_size=97).eval()(ids, None)
    assert counter.get_total_flops() == child_forward_flops(space, arch, 97, 19)
    # padding invariance, as for the other kinds
    ids = torch.randint(5, 97, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:], mask[1, 1:] = 0, 0
    other = ids.clone()
    other[mask == 0] = torch.randint(5, 97, (int((mask == 0).sum()),))
    a, b = net(ids, mask, (0, 0, 0)).hidden_states[-1], net(other, mask, (0, 0, 0)).hidden_states[-1]
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=0, atol=1e-6)
    assert torch.isfinite(a).all() and a.std() > 0.1


def test_geglu_exports_to_hugging_face(tmp_path):
    from transformers import AutoModelForMaskedLM

    from nasfast.nas.hf_model import save_folder, to_masked_lm

    space = SearchSpace.from_names(2, ["geglu:16", "conv:3", "identity"], H)
    torch.manual_seed(0)
    net = Supernet(ModelConfig(hidden=H, max_len=32, dropout=0.3), space, vocab_size=97).eval()
    arch = (0, 1)
    save_folder(to_masked_lm(net.extract(arch)), None, tmp_path / "model")
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "model")).eval()
    assert model.config.operators == ["geglu:16", "conv:3"]
    ids = torch.randint(5, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, net(ids, mask, arch).logits)
    assert model.num_parameters() == child_num_params(space, arch, 97, 32)


# --- compatibility with what was saved before the registry ------------------------------------------
# tests/fixtures/*_before_registry were written by the code of commit 964f83c (kinds switched on
# `Candidate.kind`): a supernet's initial state_dict under torch.manual_seed(0), its eval logits on a
# padded batch for four children, per-candidate costs at H=64, T=37, and an exported child.
# Weights must match bitwise; logits only to fp32 rounding, because the stored logits came from
# another CPU and fp32 GEMM kernels round differently across CPU models (3e-8 measured between
# the AMD EPYC that wrote them and an Intel Xeon).
STORED_LOGITS_TOLERANCE = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def before():
    return torch.load(FIXTURES / "supernet_before_registry.pt", weights_only=True)


def _space_and_cfg(fx):
    space = SearchSpace.from_names(fx["layers"], fx["names"], fx["hidden"])
    return space, ModelConfig(hidden=fx["hidden"], max_len=fx["max_len"], dropout=fx["dropout"])


def test_supernet_from_before_the_registry_loads_and_computes_the_same(before):
    space, cfg = _space_and_cfg(before)
    torch.manual_seed(before["init_seed"])
    net = Supernet(cfg, space, vocab_size=before["vocab"]).eval()
    # same keys, shapes and initial values (the init draws happen in the same order)
    fresh = net.state_dict()
    assert list(fresh) == list(before["state_dict"])
    assert all(torch.equal(fresh[k], v) for k, v in before["state_dict"].items())
    net.load_state_dict(before["state_dict"], strict=True)
    with torch.no_grad():
        for arch_id, logits in before["logits"].items():
            got = net(before["input_ids"], before["attention_mask"], space.parse(arch_id)).logits
            torch.testing.assert_close(got, logits, **STORED_LOGITS_TOLERANCE)
    for c in space.candidates:
        assert [c.num_params(64), c.forward_flops(64, 37)] == before["cost_h64_t37"][c.name]


def test_export_from_before_the_registry_loads(before):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(FIXTURES / "export_before_registry")).eval()
    assert model.config.operators == ["conv:3", "mha:2"]
    with torch.no_grad():
        got = model(input_ids=before["input_ids"], attention_mask=before["attention_mask"]).logits
    torch.testing.assert_close(got, before["logits"]["conv:3|mha:2"], **STORED_LOGITS_TOLERANCE)
