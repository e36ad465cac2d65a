"""C++ CPU ops (nasfast.kernels.native) against the eager references in nasfast.kernels.reference.

Every comparison evaluates three things on the same random inputs and the same random grad_output:
the native op (fp32), the eager reference (fp32), and the reference in float64 (the truth). For the
output, every gradient and the no-grad output: max|native - fp64| <= 2 * max|eager - fp64| + floor,
the floor being 4e-6 * max(1, max|fp64|) (about 32 fp32 ulps at the tensor's scale). Inputs come from
the shared generator (``nasfast.kernels.cases``): every registered op's examples, so a newly
registered op is compared here as soon as the native backend has a function of its name, plus the
extra shapes below. The extension is built once per session (and cached across sessions by cpp_extension).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from dataclasses import replace
from itertools import product

import pytest
import torch

from nasfast.kernels import cases, native_build
from nasfast.kernels import reference as ref
from nasfast.kernels.registry import get_op, get_ops

FLOOR = 4e-6
STRICT = cases.Rule(eager_factor=2.0, floor={torch.float32: FLOOR, torch.float64: 1e-12}, documented=False)


@pytest.fixture(scope="session")
def native():
    import nasfast.kernels.native as native

    if not native.available():
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {native.why_unavailable()}")
        pytest.fail(f"native build failed: {native.why_unavailable()}")
    return native


def _clone(t, dtype=None):
    if not (torch.is_tensor(t) and t.is_floating_point()):
        return t
    c = t.detach().to(dtype or t.dtype).clone()
    return c.requires_grad_(t.requires_grad)


def _assert_rule(name, got, eager, truth):
    got, eager = got.double(), eager.double()
    err = (got - truth).abs().max().item() if truth.numel() else 0.0
    err_eager = (eager - truth).abs().max().item() if truth.numel() else 0.0
    floor = FLOOR * max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
    assert err <= 2 * err_eager + floor, f"{name}: native err {err:.3g} vs eager {err_eager:.3g} (floor {floor:.3g})"


def check_op(native_fn, ref_fn, inputs, truth_fn=None):
    """Outputs and the grads of every input with requires_grad, vs fp64, with one random grad_output."""
    truth_fn = truth_fn or ref_fn
    t_in = [_clone(t, torch.float64) for t in inputs]
    n_in = [_clone(t) for t in inputs]
    e_in = [_clone(t) for t in inputs]
    truth, out, eager = truth_fn(*t_in), native_fn(*n_in), ref_fn(*e_in)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    _assert_rule("output", out, eager, truth)
    grad = torch.randn_like(truth)
    truth.backward(grad)
    out.backward(grad.to(out.dtype))
    eager.backward(grad.to(eager.dtype))
    for i, (n, e, t) in enumerate(zip(n_in, e_in, t_in)):
        if torch.is_tensor(t) and t.requires_grad:
            assert n.grad is not None and n.grad.dtype == n.dtype, f"input {i}: missing/wrong-dtype grad"
            _assert_rule(f"grad[{i}]", n.grad, e.grad, t.grad)


def rand(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


def padding_mask(B, T, kind):
    """None, or (kind "mixed") rows cycling through: no padding, padded tail with a hole, all padding
    (nasfast.kernels.cases.token_mask; drawn from torch's global RNG)."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return cases.token_mask(B, T, kind, gen)


def judge(spec, ops, case=None):
    case = case or cases.build(spec)
    # the built-ins register no tolerance of their own: 2x eager; a new op may document its own
    rule = cases.rule_of(spec.op) if get_op(spec.op).tolerance else STRICT
    bad = cases.failures(cases.judge(case, ops, rule=rule))
    assert not bad, f"{spec.describe()}:\n  " + "\n  ".join(bad)


C = cases.CaseSpec
# shapes beyond the registered examples: width 1 and 129, 2-D rows, eval mode, long sequences, every
# odd kernel width up to 7, head size 64, all-padding masks
EXTRA = (
    [C("bias_gelu", B=2, T=37, H=72, scale=1.5), C("bias_gelu", B=1, T=3, H=129, scale=1.5),
     C("bias_gelu", B=1, T=5, H=1, flat=True, scale=1.5)]
    + [C("add_dropout_layernorm", B=B, T=T, H=H, flat=flat, **mode)
       for (B, T, H, flat), mode in product([(3, 37, 72, False), (2, 7, 24, False), (1, 5, 129, True)],
                                            [dict(dropout=0.25, training=False), dict(), dict(dropout=0.25)])]
    + [C("dwconv_bias_gelu", B=3, T=T, H=H, k=k, mask=m)
       for (T, H), k, m in product([(7, 24), (37, 72), (130, 24)], [3, 5, 7], [None, "mixed"])]
    + [C("attention", B=3, heads=2, T=T, dh=dh, mask=m) for (T, dh), m in product([(7, 8), (37, 18), (100, 64), (1, 16)],
                                                                                  [None, "mixed"])]
    + [C("alignment_loss", B=3, T=37, H=72, layers=L, mask=m) for L, m in product([1, 3], [None, "mixed", "all_pad"])]
    # longer than one 128-row query block: the dK/dV accumulation over blocks and a partial last block
    + [C(op, B=2, heads=2, T=T, dh=dh, mask="mixed") for op in ("attention", "qkv_attention")
       for T, dh in ((130, 64), (257, 16))]
)


@pytest.mark.parametrize("spec", cases.example_cases() + [replace(c, seed=i) for i, c in enumerate(EXTRA)],
                         ids=lambda s: s.describe().replace(" ", "_"))
def test_matches_reference(native, spec):
    """Output, every gradient and the no-grad output of each op the native backend implements."""
    ops = get_ops("native")
    if spec.op not in ops.fused:
        pytest.skip(f"the native backend does not implement {spec.op} (it runs the eager reference)")
    judge(spec, ops)


def test_dropout_hash_path_matches_reference_with_same_mask(native):
    """fwd and bwd with the in-kernel keep pattern == reference given that pattern."""
    spec = cases.CaseSpec("add_dropout_layernorm", B=3, T=37, H=72, dropout=0.3, seed=3)
    seed = 12345
    case = cases.build(spec)
    case.values[4] = torch.ops.nasfast.dropout_keep_mask(spec.B * spec.T, spec.H, spec.dropout, seed).view(3, 37, 72)

    def hashed(x, r, w, b, p, training, eps, keep):  # the C++ op hashes its own pattern; ``keep`` is for eager
        return native._AddDropoutLayerNorm.apply(x, r, w, b, p, None, seed, eps)

    judge(spec, types.SimpleNamespace(add_dropout_layernorm=hashed), case)


def test_dropout_deterministic_and_keep_rate(native):
    x = torch.ones(64, 33, 96)  # LayerNorm of residual + dropout(1) reveals the pattern
    res, w, b = torch.zeros_like(x), torch.ones(96), torch.zeros(96)
    p = 0.3
    torch.manual_seed(7)
    y1 = native.add_dropout_layernorm(x, res, w, b, p, True)
    torch.manual_seed(7)
    y2 = native.add_dropout_layernorm(x, res, w, b, p, True)
    y3 = native.add_dropout_layernorm(x, res, w, b, p, True)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    kept = (y1 > 0).double().mean().item()  # kept -> positive after LN, dropped -> negative
    assert abs(kept - (1 - p)) < 0.01, kept
    big = torch.ops.nasfast.dropout_keep_mask(1000, 1000, 0.1, 99)
    assert abs(big.double().mean().item() - 0.9) < 0.002
    # no visible structure: neighbouring rows and columns are independent
    a = big.double() - 0.9
    assert abs((a[1:] * a[:-1]).mean().item()) < 0.002 and abs((a[:, 1:] * a[:, :-1]).mean().item()) < 0.002


def test_plain_dropout_hash_path_matches_reference_with_same_mask(native):
    """ops.dropout without a keep mask: fwd and bwd drop exactly the hashed pattern (the reference given
    that pattern), the backward reuses the forward's pattern, and torch.manual_seed reproduces it."""
    spec = cases.CaseSpec("dropout", B=3, T=37, H=72, dropout=0.3, seed=4)
    seed = 4242
    case = cases.build(spec)
    case.values[1] = torch.ops.nasfast.dropout_keep_mask(spec.B * spec.T, spec.H, spec.dropout, seed).view(3, 37, 72)

    def hashed(x, p, training, keep):  # the C++ op hashes its own pattern; ``keep`` is for eager
        return native._Dropout.apply(x, p, None, seed)

    judge(spec, types.SimpleNamespace(dropout=hashed), case)
    x = torch.randn(50, 33, 96, requires_grad=True)
    torch.manual_seed(3)
    y1 = native.dropout(x, 0.25, True)
    y1.backward(torch.ones_like(y1))
    torch.manual_seed(3)
    assert torch.equal(native.dropout(x, 0.25, True), y1)
    assert torch.equal(x.grad != 0, y1 != 0)  # the gradient flows exactly where the forward kept
    assert abs((y1 != 0).double().mean().item() - 0.75) < 0.01
    assert native.dropout(x, 0.25, False) is x and native.dropout(x, 0.0, True) is x


def test_cross_entropy_errors_and_thread_independence(native):
    """Bad targets fail like eager's (IndexError naming the target), and the loss is a fixed-order sum:
    bitwise the same on 1 and 2 threads, at the MLM head's size."""
    x = torch.randn(97, 1001)
    with pytest.raises(IndexError, match="target 1001 is out of bounds for 1001 classes"):
        native.cross_entropy(x, torch.full((97,), 1001))
    with pytest.raises(IndexError, match="target -3 is out of bounds"):
        native.cross_entropy(x, torch.full((97,), -3))
    with pytest.raises(RuntimeError, match="targets must be int64"):
        native.cross_entropy(x, torch.zeros(97, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"targets must be \[M\]"):
        native.cross_entropy(x, torch.zeros(96, dtype=torch.long))
    logits, targets = torch.randn(613, 8192, requires_grad=True), torch.randint(0, 8192, (613,))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = native.cross_entropy(logits, targets)
            results.append((loss.detach(), torch.autograd.grad(loss, logits)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inference_forwards_in_the_input_dtype(native, monkeypatch, dtype):
    """bf16/fp16 under no_grad (the bf16 MAGIC-A anchor): qkv_attention runs ATen's fused attention on
    the packed views, bias_gelu and add_dropout_layernorm half-precision C++ forwards with fp32 math
    (the LayerNorm with the fp32 kernel's hashed keep pattern), all within the fp64 rule on padded and all-padding
    batches; with autograd recording they keep the fp32 kernels."""
    taken = []
    monkeypatch.setattr(native, "_sdpa_qkv", lambda *a, _f=native._sdpa_qkv: taken.append(1) or _f(*a))
    ops = get_ops("native")
    for spec in [cases.CaseSpec("qkv_attention", B=3, heads=2, T=T, dh=dh, mask=m, dtype=dtype, scale=sc)
                 for T, dh, m, sc in ((37, 24, "mixed", 1.0), (9, 8, "all_pad", 1.0), (9, 8, "lengths", 30.0))]:
        checks = cases.judge(cases.build(spec), ops)
        assert not cases.failures(checks), (spec.describe(), cases.failures(checks))
    assert len(taken) == 3  # the no-grad forward of each case, not the forwards that record a graph
    x = torch.randn(2, 5, 37, dtype=dtype, requires_grad=True)  # 37: a vector tail after two full lanes
    tol = dict(atol=0.02 if dtype == torch.bfloat16 else 2e-3, rtol=0.01 if dtype == torch.bfloat16 else 1e-3)
    for b in (torch.randn(37, dtype=dtype), torch.randn(37)):  # bias in x's dtype, or fp32: output promotes
        with torch.no_grad():
            y = native.bias_gelu(x, b)
        assert y.dtype == torch.promote_types(dtype, b.dtype) == ref.bias_gelu(x, b).dtype
        torch.testing.assert_close(y.float(), ref.bias_gelu(x.double(), b.double()).float(), **tol)
    assert native.bias_gelu(x, b).grad_fn.name().endswith("_BiasGeluBackward")
    qkv = torch.randn(2, 5, 24, dtype=dtype)
    for bad in (torch.ones(1, 5, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)):  # no silent broadcast
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"token_mask must be \[B, T\]"):
            native.qkv_attention(qkv, 2, bad)
    # the fused LayerNorm tail: a bf16/fp16 C++ forward with the fp32 kernel's keep pattern
    for spec in (cases.CaseSpec("add_dropout_layernorm", B=3, T=37, H=72, dropout=0.1, dtype=dtype),
                 cases.CaseSpec("add_dropout_layernorm", B=2, T=5, H=17, dtype=dtype, scale=30.0)):
        assert not cases.failures(cases.judge(cases.build(spec), ops)), spec.describe()
    w, bias = torch.randn(37), torch.randn(37)
    for r in (torch.randn(2, 5, 37, dtype=dtype), torch.randn(2, 5, 37)):  # a half or an fp32 residual stream
        with torch.no_grad():
            torch.manual_seed(5)
            half = native.add_dropout_layernorm(x, r, w, bias, 0.3, True, 1e-5)
            torch.manual_seed(5)
            full = native.add_dropout_layernorm(x.float(), r.float(), w, bias, 0.3, True, 1e-5)
        assert half.dtype == r.dtype  # the residual stream keeps its precision
        torch.testing.assert_close(half.float(), full, **tol)


def test_attention_strided_views(native):
    """q, k, v as head-split views of one [B, T, 3, h, dh] projection (no copies needed)."""
    B, T, h, dh = 2, 37, 3, 16
    mask = padding_mask(B, T, "mixed")
    qkv = rand(B, T, 3, h, dh)

    def call(fn):
        return lambda t: fn(*(t[:, :, i].transpose(1, 2) for i in range(3)), mask)

    check_op(call(native.attention), call(ref.attention), [qkv])


@pytest.mark.slow
def test_attention_aten_gemm_fallback(native):
    """The GEMM path used where libtorch_cpu exports no BLAS symbols gives the same results."""
    code = (
        "import torch, nasfast.kernels.native as n\n"
        "from nasfast.kernels import reference as ref\n"
        "assert n.available(), n.why_unavailable()\n"
        "assert n.gemm_backend() == 'aten', n.gemm_backend()\n"
        "q, k, v = (torch.randn(2, 2, 37, 18, dtype=torch.float64, requires_grad=True) for _ in range(3))\n"
        "m = torch.ones(2, 37, dtype=torch.bool); m[1, 20:] = False\n"
        "a = n.attention(q, k, v, m); b = ref.attention(q, k, v, m)\n"
        "g = torch.autograd.grad(a.sum(), (q, k, v)); h = torch.autograd.grad(b.sum(), (q, k, v))\n"
        "assert torch.allclose(a, b, atol=1e-10)\n"
        "assert all(torch.allclose(x, y, atol=1e-10) for x, y in zip(g, h))\n"
    )
    env = dict(os.environ, NASFAST_NATIVE_GEMM="aten")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_alignment_loss_anchor_gets_no_grad(native):
    h, a = rand(2, 5, 8), rand(2, 5, 8)
    native.alignment_loss([h], [a]).backward()
    assert h.grad is not None and a.grad is None


# ------------------------------------------------------------------------- gradcheck (float64)
@pytest.fixture
def one_thread():
    """Tiny shapes: OpenMP barriers only add latency on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _d(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck(native, one_thread):
    from torch.autograd import gradcheck

    B, T, H = 2, 5, 6
    mask = torch.tensor([[1, 1, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    full = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    keep = torch.rand(B, T, H) >= 0.3
    assert gradcheck(native.bias_gelu, (_d(B, T, H), _d(H)))
    assert gradcheck(lambda x, r, w, b: native.add_dropout_layernorm(x, r, w, b, 0.3, True, 1e-5, keep),
                     (_d(B, T, H), _d(B, T, H), _d(H), _d(H)))
    assert gradcheck(lambda x, r, w, b: native._AddDropoutLayerNorm.apply(x, r, w, b, 0.3, None, 5, 1e-5),
                     (_d(B, T, H), _d(B, T, H), _d(H), _d(H)))
    for k in (3, 5):
        assert gradcheck(lambda x, w, b: native.dwconv_bias_gelu(x, w, b, mask), (_d(B, T, H), _d(H, k), _d(H)))
    for m in (None, mask, full):
        assert gradcheck(lambda q, k, v: native.attention(q, k, v, m), (_d(B, 2, T, 3), _d(B, 2, T, 3), _d(B, 2, T, 3)))
    a1, a2 = torch.randn(B, T, H, dtype=torch.float64), torch.randn(B, T, H, dtype=torch.float64)
    assert gradcheck(lambda h1, h2: native.alignment_loss([h1, h2], [a1, a2], full), (_d(B, T, H), _d(B, T, H)))


# ------------------------------------------------------------------------ dtypes, integration
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_upcast(native, dtype):
    x, b = rand(4, 7, 24).to(dtype).detach().requires_grad_(), rand(24).to(dtype).detach().requires_grad_()
    y = native.bias_gelu(x, b)
    y.sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype and b.grad.dtype == dtype
    torch.testing.assert_close(y.float(), ref.bias_gelu(x.float(), b.float()), atol=2e-2, rtol=2e-2)


def test_backend_selects_native(native):
    from nasfast.kernels.registry import get_ops

    ops = get_ops("native", "cpu")
    assert ops.name == "native" and ops.attention is native.attention
    assert get_ops("auto", "cpu").name == "native"


def test_convergence_matches_eager(native, one_thread):
    """A small post-LN block trained 20 steps with each backend: same loss curve."""
    from nasfast.kernels.registry import get_ops

    B, T, H, nh, k = 4, 17, 24, 2, 5
    mask = padding_mask(B, T, "mixed")
    mask[2] = True  # keep the batch learnable
    data, target = torch.randn(B, T, H), torch.randn(B, T, H)

    def run(ops):
        torch.manual_seed(0)
        params = {
            "wqkv": torch.randn(H, 3 * H) * H**-0.5, "w1": torch.randn(H, 2 * H) * H**-0.5,
            "b1": torch.zeros(2 * H), "w2": torch.randn(2 * H, H) * (2 * H) ** -0.5,
            "cw": torch.randn(H, k) * 0.3, "cb": torch.zeros(H), "g": torch.ones(H), "b": torch.zeros(H),
        }
        for p in params.values():
            p.requires_grad_()
        opt = torch.optim.SGD(params.values(), lr=0.05)
        anchor = torch.randn(B, T, H)
        losses = []
        for step in range(20):
            P = params
            qkv = (data @ P["wqkv"]).view(B, T, 3, nh, H // nh)
            a = ops.attention(*(qkv[:, :, i].transpose(1, 2) for i in range(3)), mask)
            h1 = ops.add_dropout_layernorm(a.transpose(1, 2).reshape(B, T, H), data, P["g"], P["b"], 0.1, False)
            f = ops.bias_gelu(h1 @ P["w1"], P["b1"]) @ P["w2"]
            h2 = ops.dwconv_bias_gelu(f, P["cw"], P["cb"], mask)
            loss = ((h2 - target) ** 2).mean() + 0.1 * ops.alignment_loss([h1, h2], [anchor, anchor], mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    eager, fused = run(get_ops("eager")), run(get_ops("native"))
    assert fused[-1] < fused[0]
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_build_lock_left_by_a_killed_build_does_not_hang(native):
    """torch's JIT build waits forever on a ``lock`` file that a SIGKILLed build left behind; nasfast
    takes an OS lock (released when its holder dies) and clears such a file under it."""
    build_dir = native_build._build_dir(native_build._arch(), native_build._sources_dir())
    assert (build_dir / "nasfast.lock").exists()  # the session's build went through the OS lock
    (build_dir / "lock").write_text("")  # what a killed build leaves
    code = "import nasfast.kernels.native as n; assert n.available(), n.why_unavailable()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (build_dir / "lock").exists()


def test_build_folder_follows_the_source_content(native, tmp_path):
    src = native_build._sources_dir()
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    assert native_build._build_dir("avx2", copy) == native_build._build_dir("avx2", src)  # same content, same build
    first = sorted(copy.glob("*.cpp"))[0]
    first.write_text(first.read_text() + "\n// edited\n")
    assert native_build._build_dir("avx2", copy) != native_build._build_dir("avx2", src)


def test_native_arch_env_caps_the_build_isa(native, monkeypatch):
    widest = {"AVX2": "avx2", "AVX512": "avx512"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    monkeypatch.delenv("NASFAST_NATIVE_ARCH", raising=False)
    assert native_build._arch() in (widest, "default")  # default only off x86
    monkeypatch.setenv("NASFAST_NATIVE_ARCH", "default")
    assert native_build._arch() == "default"
    monkeypatch.setenv("NASFAST_NATIVE_ARCH", "avx512")  # a cap never raises the ISA above the CPU's
    assert native_build._arch() in (widest, "default")
    monkeypatch.setenv("NASFAST_NATIVE_ARCH", "sse9")
    with pytest.raises(ValueError, match="NASFAST_NATIVE_ARCH"):
        native_build._arch()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["avx2", "default"])
def test_narrower_isa_builds_compute_what_the_widest_build_computes(native, arch, tmp_path):
    """Each ISA is its own build (own folder, own .so); on the same inputs it must agree with the
    build this machine uses by default (fp32 within rounding of the vector width, fp64 tighter)."""
    uncapped = {k: v for k, v in os.environ.items() if k != "NASFAST_NATIVE_ARCH"}
    widest = subprocess.run([sys.executable, "-c", "import nasfast.kernels.native_build as n; print(n._arch())"],
                            env=uncapped, capture_output=True, text=True, check=True).stdout.strip()
    order = ["default", "avx2", "avx512"]
    if order.index(arch) >= order.index(widest):
        pytest.skip(f"this CPU's widest native build is {widest}: no narrower {arch} build to compare")
    code = r"""
import sys, torch
from nasfast.kernels import native, native_build
assert native.available(), native.why_unavailable()
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 203, generator=g); b = torch.randn(203, generator=g); gy = torch.randn(37, 203, generator=g)
qkv = torch.randn(3, 77, 3 * 40, generator=g); go = torch.randn(3, 77, 40, generator=g)
mask = torch.ones(3, 77, dtype=torch.bool); mask[1, 50:] = False
out = {"arch": native_build._arch(), "gelu": torch.ops.nasfast.bias_gelu_fwd(x, b),
       "gelu_bwd": torch.ops.nasfast.bias_gelu_bwd(gy, x, b)[0],
       "att": torch.ops.nasfast.attention_qkv_fwd(qkv, 5, mask)[0],
       "att_bwd": torch.ops.nasfast.attention_qkv_bwd(go, qkv, 5, mask)}
torch.save(out, sys.argv[1])
"""
    results = {}
    for label, env_arch in (("widest", ""), (arch, arch)):
        env = {**os.environ, "NASFAST_NATIVE_ARCH": env_arch}
        path = tmp_path / f"{label}.pt"
        r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        results[label] = torch.load(path)
    assert results[arch]["arch"] == arch
    for key in ("gelu", "gelu_bwd", "att", "att_bwd"):
        torch.testing.assert_close(results[arch][key], results["widest"][key], rtol=2e-5, atol=2e-6)
