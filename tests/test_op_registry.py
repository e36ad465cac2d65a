"""The fused-op registry (nasfast.kernels.registry): a toy op and toy backends registered from this file only.

Proves the one-place claim: registering an op (reference + case inputs) and a backend that
implements a subset of the ops is all it takes; the shared case generator, the error rule and the
benchmark inputs pick the op up, every op a backend lacks falls back to its eager reference on its
own, the backend reports which ops it fused, and the supernet trains with it.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import MICRO_OVERRIDES

from nasfast.cli.app import main
from nasfast.config import load_config
from nasfast.kernels import cases
from nasfast.kernels import reference as ref
from nasfast.kernels import registry as backend
from nasfast.kernels.registry import Backend, FusedOp, OpInputs, get_op, get_ops, op_names
from nasfast.training.metrics import read_metrics
from nasfast.training.trainer import Trainer

BUILTIN = ("bias_gelu", "add_dropout_layernorm", "dwconv_bias_gelu", "attention", "alignment_loss", "linear", "qkv_attention",
           "dropout", "cross_entropy")


# ------------------------------------------------------------------------------- the toy op
def scaled_tanh_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Toy op: ``tanh(x) * weight``, x [..., H], weight [H]."""
    return torch.tanh(x) * weight


class _ScaledTanh(torch.autograd.Function):
    """The toy backend's "kernel": forward and backward written out by hand (fp32 internally)."""

    @staticmethod
    def forward(ctx, x, weight):
        t = torch.tanh(x.float())
        ctx.save_for_backward(t, weight)
        return (t * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        t, weight = ctx.saved_tensors
        g = grad.float()
        dx = g * weight.float() * (1 - t * t)
        dw = (g * t).reshape(-1, t.shape[-1]).sum(0)
        return dx.to(grad.dtype), dw.to(weight.dtype)


def scaled_tanh_fused(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _ScaledTanh.apply(x, weight)


def _toy_inputs(spec, rnd, gen):
    values = [rnd(spec.B, spec.T, spec.H, scale=2.0 * spec.scale), rnd(spec.H)]
    return OpInputs(values, [True, True], lambda ops, x, w: ops.scaled_tanh(x, w), ["y", "dx", "dweight"])


TOY_OP = FusedOp(
    "scaled_tanh", scaled_tanh_reference, _toy_inputs, lambda spec: ["x", "weight"],
    tolerance=dict(eager_factor=2.0),  # stricter than the default 3x: the toy kernel is simple
    layout_base=dict(B=2, T=5, H=24),
    examples=(dict(B=3, T=37, H=72), dict(B=1, T=1, H=5), dict(B=2, T=0, H=24)),
    bench=lambda s: (dict(B=s["B"], T=s["T"], H=s["H"]), f"x[{s['B']},{s['T']},{s['H']}]"),
)


class Counted:
    """Wraps a function and counts its calls (to show the fused one ran inside the training step)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


@pytest.fixture
def toy():
    """The toy op, a backend implementing only it, and a backend implementing only bias_gelu."""
    backend.register_op(TOY_OP)
    gelu = Counted(ref.bias_gelu)
    backend.register_backend(Backend("toy", impls={"scaled_tanh": scaled_tanh_fused}))
    backend.register_backend(Backend("toy_gelu", impls={"bias_gelu": gelu}))
    try:
        yield gelu
    finally:
        backend.unregister_backend("toy")
        backend.unregister_backend("toy_gelu")
        backend.unregister_op("scaled_tanh")
    assert "scaled_tanh" not in op_names() and "toy" not in backend.known_backends()


# ------------------------------------------------------------------------------- resolution
def test_backend_with_one_op_falls_back_per_op(toy):
    ops = get_ops("toy")
    assert op_names() == (*BUILTIN, "scaled_tanh")
    assert ops.name == "toy" and ops.fused == ("scaled_tanh",) and ops.fallback == BUILTIN
    assert ops.scaled_tanh is scaled_tanh_fused and ops["scaled_tanh"] is scaled_tanh_fused
    for name in BUILTIN:  # every other op is exactly its eager reference
        assert getattr(ops, name) is getattr(ref, name) is get_op(name).reference
    assert ops.report() == {"backend": "toy", "fused_ops": ["scaled_tanh"], "eager_ops": list(BUILTIN)}
    assert ops.describe() == ("toy: fused 1/10 (scaled_tanh); eager reference: "
                              "bias_gelu, add_dropout_layernorm, dwconv_bias_gelu, attention, alignment_loss, linear, "
                              "qkv_attention, dropout, cross_entropy")
    # the other backends do not implement the toy op: it runs its reference there
    eager = get_ops("eager")
    assert eager.scaled_tanh is scaled_tanh_reference and eager.fused == () and len(eager.fallback) == 10
    partial = get_ops("toy_gelu")
    assert partial.fused == ("bias_gelu",) and partial.bias_gelu is toy and partial.attention is ref.attention
    with pytest.raises(AttributeError, match="has no op 'softmax'"):
        get_ops("toy").softmax


def test_registration_errors(toy):
    with pytest.raises(ValueError, match="already registered"):
        backend.register_op(TOY_OP)
    with pytest.raises(ValueError, match="already registered"):
        backend.register_backend(Backend("toy", impls={}))
    with pytest.raises(ValueError, match="already registered"):
        backend.register_backend(Backend("native", impls={}))
    backend.register_backend(Backend("bad", impls={"softmax": torch.softmax}))
    try:
        with pytest.raises(ValueError, match="unregistered op"):
            get_ops("bad")
    finally:
        backend.unregister_backend("bad")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        get_ops("nope")
    with pytest.raises(ValueError, match="unknown fused op"):
        get_op("nope")


def test_unavailable_backend_raises_and_auto_falls_back(monkeypatch):
    broken = Backend("broken", impls={"bias_gelu": ref.bias_gelu}, why_unavailable=lambda: "no device")
    backend.register_backend(broken)
    try:
        with pytest.raises(RuntimeError, match="backend 'broken' is not available: no device"):
            get_ops("broken")
        monkeypatch.setitem(backend.AUTO_PREFERENCE, "cpu", "broken")
        with pytest.warns(UserWarning, match="falling back to eager"):
            assert get_ops("auto", "cpu").name == "eager"
    finally:
        backend.unregister_backend("broken")


# ------------------------------------------------------------------ the shared generator picks it up
def test_cases_and_benchmarks_pick_up_the_toy_op(toy):
    assert "scaled_tanh" in cases.OPS
    examples = cases.example_cases(ops=["scaled_tanh"])
    layouts = [s for s in cases.layout_cases() if s.op == "scaled_tanh"]
    assert len(examples) == 3 and len(layouts) == len(cases.LAYOUTS[1:]) + 2  # every layout, then one argument at a time
    assert {s.layout_of(0) for s in layouts} >= set(cases.LAYOUTS) and examples[-1].describe().startswith("scaled_tanh B2 T0")
    toy_ops = get_ops("toy")
    for spec in examples + layouts:
        for dtype in (torch.float32, torch.float16):
            spec = replace(spec, dtype=dtype)
            checks = cases.judge(cases.build(spec), toy_ops)  # by the op's registered rule
            assert not cases.failures(checks), (spec.describe(), cases.failures(checks))
            assert [c.name for c in checks] == ["y", "dx", "dweight", "y(no_grad)"]
    assert cases.rule_of("scaled_tanh").eager_factor == 2.0 and cases.rule_of("attention") == cases.DEFAULT_RULE
    # the rule fails a wrong kernel: the judge is not vacuous for a registered op
    wrong = type("Wrong", (), {"scaled_tanh": staticmethod(lambda x, w: scaled_tanh_fused(x, w) * 1.001)})
    assert cases.failures(cases.judge(cases.build(examples[0]), wrong))
    shape, leaves, call = cases.bench_inputs("scaled_tanh", 4, 16, 24, heads=2, layers=2, ffn=96,
                                             dtype=torch.float32, device="cpu")
    out = call(toy_ops, *leaves)
    assert shape == "x[4,16,24]" and out.shape == (4, 16, 24) and len(leaves) == 2


# ------------------------------------------------------------------------ trains with it
def _train_one_step(tmp_path, name: str, backend_name: str) -> dict:
    cfg = load_config(None, [*MICRO_OVERRIDES, f"kernels.backend={backend_name}", "train.steps=1", "train.warmup_steps=1",
                             "train.eval_every=1", "train.ckpt_every=1"])
    summary = Trainer(cfg, tmp_path / name, progress=False).train()
    assert summary["status"] == "completed" and summary["step"] == 1
    return read_metrics(tmp_path / name / "metrics.jsonl")[0]


def test_supernet_trains_one_step_with_the_toy_backends(toy, tmp_path, micro_yaml, capsys):
    eager = _train_one_step(tmp_path, "eager", "eager")
    # the toy backend: every op the supernet calls is the eager reference -> the same step, bitwise
    code = main(["pretrain", "--no-progress", "--out", str(tmp_path / "toy"), "--config", str(micro_yaml),
                 "--set", "kernels.backend=toy", "--set", "train.steps=1", "--set", "train.warmup_steps=1", "--set", "train.eval_every=1",
                 "--set", "train.ckpt_every=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0] == f"kernels: {get_ops('toy').describe()}"  # logged once, before the first step
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["backend"] == "toy" and summary["fused_ops"] == ["scaled_tanh"]
    toy_step = read_metrics(tmp_path / "toy" / "metrics.jsonl")[0]
    assert toy_step["loss"] == eager["loss"] and toy_step["child"] == eager["child"]
    # a backend with one of the supernet's own ops: that op runs fused inside the step, the rest eager
    partial = _train_one_step(tmp_path, "partial", "toy_gelu")
    assert toy.calls > 0 and partial["loss"] == eager["loss"]
    assert json.loads((tmp_path / "partial" / "summary.json").read_text())["fused_ops"] == ["bias_gelu"]


def test_fixed_case_seeds_do_not_depend_on_which_ops_are_listed():
    """A case's inputs follow from (op, layout, index): registering or selecting other ops changes none."""
    from nasfast.kernels import cases

    for make in (cases.layout_cases, cases.example_cases):
        every = [c for c in make() if c.op == "attention"]
        alone = make(ops=["attention"])
        assert [c.seed for c in alone] == [c.seed for c in every] and len({c.seed for c in alone}) > 1
