"""Triton kernels (nasfast.kernels.triton_ops) vs the eager references, forward and every gradient.

Runs on CPU through the Triton interpreter: TRITON_INTERPRET=1 must be set before triton is first
imported, so run this file in a fresh process (``pytest tests/test_triton_kernels.py``); if another
module imported triton earlier without it, the module is skipped with that reason.
Error rule (flash-attention's): max|kernel - fp64 ref| <= 2 * max|eager same dtype - fp64 ref| + floor,
on every registered op's examples (``nasfast.kernels.cases.example_cases``: a newly registered op is
compared here as soon as the triton backend has a function of its name).
Set NASFAST_ERR_REPORT=path.json to dump the measured error ratios.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton

import json
import types
from dataclasses import replace

import pytest
import torch

from nasfast.kernels import cases
from nasfast.kernels import reference as ref
from nasfast.kernels.registry import get_op, get_ops

try:
    from triton.runtime.interpreter import InterpretedFunction

    from nasfast.kernels import alignment, attention, bias_gelu, dwconv, layernorm, triton_ops  # noqa: F401
    _INTERPRETED = isinstance(bias_gelu._bias_gelu_fwd_kernel, InterpretedFunction)
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"triton unavailable: {exc}", allow_module_level=True)

if not torch.cuda.is_available() and not _INTERPRETED:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run this file in a fresh process",
                allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() and not _INTERPRETED else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]
STRICT = cases.Rule(eager_factor=2.0, floor=FLOOR, documented=False)
RATIOS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("NASFAST_ERR_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(RATIOS, f, indent=1, sort_keys=True)


def _seed(request):
    # a different random draw per test case, reproducible from its id
    torch.manual_seed(hash(request.node.nodeid) % (2**31))


def rnd(*shape, dtype, scale=1.0, grad=True):
    t = (torch.randn(*shape, dtype=torch.float64, device=DEV) * scale).to(dtype)
    return t.requires_grad_(grad)


def padding_mask(B, T):
    """Rows cycle: no padding, padded tail with a hole, all padding (nasfast.kernels.cases "mixed");
    drawn from torch's global RNG, so each test's seed decides it."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return cases.token_mask(B, T, "mixed", gen).to(DEV)


def judge(spec, ops, case=None):
    """The strict rule on the output, every gradient and the no-grad output; records the ratios."""
    case = case or cases.build(spec, DEV)
    # the built-ins register no tolerance of their own: 2x eager; a new op may document its own
    checks = cases.judge(case, ops, rule=cases.rule_of(spec.op) if get_op(spec.op).tolerance else STRICT)
    for c in checks:
        key = f"{spec.op}/{str(spec.dtype).split('.')[-1]}/{c.name}"
        RATIOS[key] = max(RATIOS.get(key, 0.0), c.err / max(c.eager_err, 1e-30))
    bad = cases.failures(checks)
    assert not bad, f"{spec.describe()}:\n  " + "\n  ".join(bad)


# ------------------------------------------------------------------- every registered op's examples
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", cases.example_cases(), ids=lambda s: s.describe().replace(" ", "_"))
def test_matches_reference(spec, dtype):
    """Output, every gradient and the no-grad output of each op on its registered awkward-shape
    examples (odd lengths, non-power-of-two widths, padding masks, 2-D inputs, dropout/eval)."""
    ops = get_ops("triton", DEV)
    if spec.op not in ops.fused:
        pytest.skip(f"the triton backend does not implement {spec.op} (it runs the eager reference)")
    judge(replace(spec, dtype=dtype), ops)


# ------------------------------------------------------------------------- add_dropout_layernorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_dropout_layernorm_seeded_mask(dtype):
    """The in-kernel mask (reproduced by draw_seed + dropout_keep_mask) is the one used in fwd and bwd."""
    spec = cases.CaseSpec("add_dropout_layernorm", B=3, T=37, H=48, dropout=0.25, dtype=dtype, seed=5)
    case = cases.build(spec, DEV)
    torch.manual_seed(1234)
    case.values[4] = layernorm.dropout_keep_mask(layernorm.draw_seed(DEV), tuple(case.values[0].shape), spec.dropout)

    def seeded(x, r, w, b, p, training, eps, keep):  # the kernel draws its own pattern; ``keep`` only for eager
        torch.manual_seed(1234)
        return triton_ops.add_dropout_layernorm(x, r, w, b, p, training, eps)

    judge(spec, types.SimpleNamespace(add_dropout_layernorm=seeded), case)


def test_dropout_deterministic_and_keep_rate():
    shape, p = (64, 1000), 0.25
    x = torch.randn(shape, device=DEV)
    r, w, b = torch.zeros_like(x), torch.ones(shape[-1], device=DEV), torch.zeros(shape[-1], device=DEV)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(triton_ops.add_dropout_layernorm(x, r, w, b, p, True, 1e-5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    torch.manual_seed(7)
    keep = layernorm.dropout_keep_mask(layernorm.draw_seed(DEV), shape, p)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 1e-3, rate
    # dropped positions are exactly zero before the LayerNorm: the output equals LN(x * keep / (1 - p))
    expect = torch.nn.functional.layer_norm(x * keep / (1 - p), shape[-1:], w, b, 1e-5)
    torch.testing.assert_close(outs[0], expect, rtol=1e-5, atol=1e-5)
    # eval mode ignores dropout entirely
    torch.testing.assert_close(triton_ops.add_dropout_layernorm(x, r, w, b, p, False, 1e-5),
                               torch.nn.functional.layer_norm(x, shape[-1:], w, b, 1e-5), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- attention
def test_attention_all_pad_row_and_masked_keys(request):
    _seed(request)
    B, NH, T, DH = 3, 2, 7, 16
    q, k, v = (rnd(B, NH, T, DH, dtype=torch.float32) for _ in range(3))
    tm = padding_mask(B, T)
    o = triton_ops.attention(q, k, v, tm)
    o.backward(torch.randn_like(o))
    assert torch.equal(o[-1].detach(), torch.zeros_like(o[-1]))  # all keys padded -> zeros
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    pad = ~tm[:, None, :, None].expand_as(k)
    assert torch.equal(k.grad[pad], torch.zeros_like(k.grad[pad]))  # padded keys: zero probability
    assert torch.equal(v.grad[pad], torch.zeros_like(v.grad[pad]))


def test_attention_strided_inputs(request):
    """q, k, v as head-split views of one [B, T, 3, h, dh] projection, as a model produces them."""
    _seed(request)
    B, T, NH, DH = 2, 37, 3, 16
    qkv = torch.randn(B, T, 3, NH, DH, device=DEV, requires_grad=True)
    tm = padding_mask(B, T)
    outs = []
    for impl in (triton_ops.attention, ref.attention):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = impl(q, k, v, tm)
        (g,) = torch.autograd.grad(o, qkv, torch.ones_like(o))
        outs.append((o, g))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- alignment_loss
def test_alignment_anchor_gets_no_gradient(request):
    _seed(request)
    child = [torch.randn(2, 7, 24, device=DEV, requires_grad=True) for _ in range(2)]
    anchor = [torch.randn(2, 7, 24, device=DEV, requires_grad=True) for _ in range(2)]
    loss = triton_ops.alignment_loss(child, anchor, padding_mask(2, 7))
    loss.backward()
    assert all(a.grad is None for a in anchor) and all(c.grad is not None for c in child)
    with torch.no_grad():  # no gradient pass: loss only
        torch.testing.assert_close(triton_ops.alignment_loss(child, anchor), ref.alignment_loss(child, anchor))


# ------------------------------------------------------------------------------ fp64 gradcheck
def _gradcheck_cases():
    f64 = dict(dtype=torch.float64)
    tm = padding_mask(3, 5)
    keep = torch.rand(2, 5, 6, device=DEV) >= 0.3

    def seeded(*a):
        torch.manual_seed(3)
        return triton_ops.add_dropout_layernorm(*a, 0.3, True, 1e-5)

    anchor = [rnd(3, 5, 6, grad=False, **f64) for _ in range(2)]
    return {
        "bias_gelu": (triton_ops.bias_gelu, lambda: (rnd(2, 5, 6, **f64), rnd(6, **f64))),
        "layernorm_mask": (lambda *a: triton_ops.add_dropout_layernorm(*a, 0.3, True, 1e-5, keep),
                           lambda: (rnd(2, 5, 6, **f64), rnd(2, 5, 6, **f64), rnd(6, **f64), rnd(6, **f64))),
        "layernorm_seed": (seeded, lambda: (rnd(2, 5, 6, **f64), rnd(2, 5, 6, **f64), rnd(6, **f64), rnd(6, **f64))),
        "dwconv": (lambda *a: triton_ops.dwconv_bias_gelu(*a, tm), lambda: (rnd(3, 5, 6, **f64), rnd(6, 5, **f64), rnd(6, **f64))),
        "attention": (lambda *a: triton_ops.attention(*a, tm), lambda: tuple(rnd(3, 2, 5, 8, **f64) for _ in range(3))),
        "alignment": (lambda *c: triton_ops.alignment_loss(list(c), anchor, tm), lambda: tuple(rnd(3, 5, 6, **f64) for _ in range(2))),
    }


@pytest.mark.parametrize("case", ["bias_gelu", "layernorm_mask", "layernorm_seed", "dwconv", "attention", "alignment"])
def test_gradcheck_fp64(request, case):
    """fp64 gradcheck (fast mode: random projections, so a few kernel launches instead of one per element)."""
    _seed(request)
    fn, make = _gradcheck_cases()[case]
    assert torch.autograd.gradcheck(fn, make(), fast_mode=True)


# ------------------------------------------------------------------------------- integration
def test_backend_loads_with_reference_signatures():
    import inspect

    from nasfast.kernels.registry import OP_NAMES, get_ops

    ops = get_ops("triton", DEV)
    assert ops.name == "triton" and triton_ops.available() and triton_ops.why_unavailable() == ""
    for name in OP_NAMES:
        assert inspect.signature(getattr(ops, name)) == inspect.signature(getattr(ref, name)), name
        # ops without a Triton kernel (linear, qkv_attention) run their eager reference on this backend
        assert hasattr(torch.ops.nasfast_triton, f"{name}_fwd") or name == "alignment_loss" or name not in ops.fused
    assert hasattr(torch.ops.nasfast_triton, "alignment_loss_fwd")


@pytest.mark.slow
def test_torch_compile_treats_ops_as_opaque():
    """fullgraph compile (aot_eager: no C++ compiler needed) through all five ops, same values/grads."""
    B, T, H = 2, 7, 24
    x, b, w = torch.randn(B, T, H, requires_grad=True), torch.randn(H, requires_grad=True), torch.randn(H, requires_grad=True)
    cw, q = torch.randn(H, 3, requires_grad=True), torch.randn(B, 2, T, 12, requires_grad=True)
    tm = padding_mask(B, T).cpu()

    def f(x, b, w, cw, q):
        y = triton_ops.bias_gelu(x, b)
        y = triton_ops.add_dropout_layernorm(y, x, w, b, 0.1, True)
        y = triton_ops.dwconv_bias_gelu(y, cw, b, tm)
        o = triton_ops.attention(q, q, q, tm)
        return y.sum() + o.sum() + triton_ops.alignment_loss([y], [x], tm)

    args = (x, b, w, cw, q)
    torch.manual_seed(0)
    l1 = f(*args)
    g1 = torch.autograd.grad(l1, args)
    torch.manual_seed(0)
    l2 = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    g2 = torch.autograd.grad(l2, args)
    torch.testing.assert_close(l1, l2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


@pytest.mark.slow
def test_convergence_matches_eager():
    """A few dozen SGD steps of a small post-LN block stack: fused and eager losses stay together."""
    from nasfast.kernels.registry import get_ops

    B, T, H, NH = 4, 13, 24, 2
    torch.manual_seed(0)
    data = torch.randn(B, T, H)
    target = torch.randn(B, T, H)
    tm = padding_mask(B, T).cpu()
    init = {"w1": torch.randn(H, 2 * H) * 0.2, "b1": torch.randn(2 * H) * 0.1, "w2": torch.randn(2 * H, H) * 0.2,
            "wq": torch.randn(H, 3 * H) * 0.2, "cw": torch.randn(H, 5) * 0.3, "cb": torch.zeros(H),
            "g": torch.ones(H), "beta": torch.zeros(H)}
    histories = []
    for backend in ("eager", "triton"):
        ops = get_ops(backend, "cpu")
        p = {k: v.clone().requires_grad_() for k, v in init.items()}
        opt = torch.optim.SGD(p.values(), lr=0.05)
        losses = []
        for _ in range(8):
            h = data
            y = ops.bias_gelu(h @ p["w1"], p["b1"]) @ p["w2"]
            h1 = ops.add_dropout_layernorm(y, h, p["g"], p["beta"], 0.0, True)
            q, k, v = (h1 @ p["wq"]).view(B, T, 3, NH, H // NH).permute(2, 0, 3, 1, 4).unbind(0)
            a = ops.attention(q, k, v, tm).transpose(1, 2).reshape(B, T, H)
            h2 = ops.add_dropout_layernorm(a, h1, p["g"], p["beta"], 0.0, True)
            h3 = ops.dwconv_bias_gelu(h2, p["cw"], p["cb"], tm)
            loss = ops.alignment_loss([h3], [target], tm) + ops.alignment_loss([h1, h2], [h2.detach(), h1.detach()], tm)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        histories.append(losses)
    assert histories[0][-1] < histories[0][0]
    torch.testing.assert_close(torch.tensor(histories[1]), torch.tensor(histories[0]), rtol=1e-3, atol=1e-4)
