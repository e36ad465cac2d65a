"""The built-in fused ops, one registration each (see ``nasfast.kernels.registry.FusedOp``).

A registration says everything the tests and benchmarks need to know about an op: its eager
reference (``nasfast.kernels.reference``), its tensor arguments and how to generate them for a
``nasfast.kernels.cases.CaseSpec`` (random values at the spec's sizes, padding masks from the shared
generator), the fixed awkward-shape examples every backend is compared on, the layout and regression
cases, the sizes the property tests draw, and its realistic benchmark case. Backends
(``nasfast.kernels.triton_ops``, ``nasfast.kernels.native``) implement ops by defining functions of these names.

``rnd(*shape, scale=, shift=)`` draws float64 values rounded to the case dtype (the case dtype itself
for timing-only cases); ``gen`` is the case's generator (masks, keep patterns). The draw order of each
op is part of its cases' identity: changing it changes every stored case's values.
"""
from __future__ import annotations

import math

import torch

from nasfast.kernels import reference
from nasfast.kernels.cases import Case, max_abs
from nasfast.kernels.registry import FusedOp, OpInputs, register_op

HEAD_DIMS = (1, 2, 3, 5, 8, 13, 16, 17, 24, 31, 40, 64)  # head sizes the property tests draw


def _mask(m):
    """The optional trailing token-mask argument of a masked op's call."""
    return m[0] if m else None


def _rows(spec):
    """x's shape: [B, T, H], or [B*T, H] for a ``flat`` (2-D) case of a row-wise op."""
    return (spec.B * spec.T, spec.H) if spec.flat else (spec.B, spec.T, spec.H)


# ------------------------------------------------------------------------------------ bias_gelu
def _bias_gelu_inputs(spec, rnd, gen):
    values = [rnd(*_rows(spec), scale=2.0 * spec.scale), rnd(spec.H)]
    return OpInputs(values, [True, True], lambda ops, x, b: ops.bias_gelu(x, b), ["y", "dx", "dbias"])


register_op(FusedOp(
    "bias_gelu", reference.bias_gelu, _bias_gelu_inputs, lambda spec: ["x", "bias"],
    layout_base=dict(B=3, T=5, H=40),
    examples=(dict(B=3, T=37, H=72), dict(B=1, T=7, H=24, flat=True), dict(B=1, T=1, H=100, flat=True)),
    bench=lambda s: (dict(B=s["B"], T=s["T"], H=s["ffn"]), f"x[{s['B']},{s['T']},{s['ffn']}]"),
))


# ------------------------------------------------------------------------ add_dropout_layernorm
def _layernorm_inputs(spec, rnd, gen):
    s, shape = spec.scale, _rows(spec)
    values = [rnd(*shape, scale=s), rnd(*shape, scale=s, shift=0.5 * s), rnd(spec.H, scale=0.5, shift=1.0), rnd(spec.H)]
    diff = [True, True, True, True]
    p, training = spec.dropout, spec.training
    if p > 0:  # an explicit keep mask: every backend drops the same positions
        values.append(torch.rand(*shape, generator=gen) >= p)
        diff.append(False)

        def call(ops, x, r, w, b, keep):
            return ops.add_dropout_layernorm(x, r, w, b, p, training, 1e-5, keep)
    else:
        def call(ops, x, r, w, b):
            return ops.add_dropout_layernorm(x, r, w, b, 0.0, training, 1e-5)
    return OpInputs(values, diff, call, ["y", "dx", "dresidual", "dweight", "dbias"])


def _layernorm_bench(s):
    p = s["dropout"]
    kwargs = dict(B=s["B"], T=s["T"], H=s["H"], dropout=p if s["keep_mask"] else 0.0)
    shape = f"x[{s['B']},{s['T']},{s['H']}] p={p:g}"
    if s["keep_mask"]:
        return kwargs, shape
    # no keep mask: each backend draws its own pattern (what training does)
    return kwargs, shape, lambda ops, x, r, w, b: ops.add_dropout_layernorm(x, r, w, b, p, True)


register_op(FusedOp(
    "add_dropout_layernorm", reference.add_dropout_layernorm, _layernorm_inputs,
    lambda spec: ["x", "residual", "weight", "bias"] + (["keep_mask"] if spec.dropout > 0 else []),
    search=dict(dropout=(0.0, 0.1, 0.5)),
    layout_base=dict(B=2, T=3, H=40, dropout=0.25),
    regressions=(dict(B=2, T=3, H=40, layouts=("contiguous", "contiguous", "strided", "strided")),),  # strided LN weight/bias
    examples=(dict(B=3, T=37, H=72, dropout=0.1), dict(B=1, T=7, H=24, flat=True),
              dict(B=2, T=5, H=48, dropout=0.3, training=False)),
    bench=_layernorm_bench,
))


# ------------------------------------------------------------------------------ dwconv_bias_gelu
def _dwconv_inputs(spec, rnd, gen):
    B, T, H = spec.B, spec.T, spec.H
    values = [rnd(B, T, H, scale=spec.scale), rnd(H, spec.k, scale=0.5), rnd(H)]
    return OpInputs(values, [True, True, True], lambda ops, x, w, b, *m: ops.dwconv_bias_gelu(x, w, b, _mask(m)),
                    ["y", "dx", "dweight", "dbias"])


def _odd_width(spec):
    if spec.k % 2 != 1:
        raise ValueError("dwconv kernel width must be odd")


register_op(FusedOp(
    "dwconv_bias_gelu", reference.dwconv_bias_gelu, _dwconv_inputs, lambda spec: ["x", "weight", "bias"],
    masked=True, validate=_odd_width,
    dims=lambda s: f"B{s.B} T{s.T} H{s.H} k{s.k}",
    search=dict(k=(1, 3, 5, 7, 9, 15)),  # often wider than T
    layout_base=dict(B=2, T=5, H=40, k=3, mask="mixed"),
    regressions=(dict(B=2, T=5, H=40, k=3, layouts=("contiguous", "contiguous", "strided")),  # strided bias
                 dict(B=2, T=3, H=17, k=9, mask="last")),  # kernel wider than T
    examples=(dict(B=3, T=37, H=48, k=3, mask="mixed"), dict(B=3, T=37, H=48, k=5, mask="mixed"),
              dict(B=4, T=7, H=24, k=7, mask="mixed"), dict(B=2, T=37, H=72, k=5),
              dict(B=1, T=7, H=24, k=9, mask="mixed")),
    bench=lambda s: (dict(B=s["B"], T=s["T"], H=s["H"], k=s["k"], mask="lengths"),
                     f"x[{s['B']},{s['T']},{s['H']}] k={s['k']} masked"),
))


# ------------------------------------------------------------------------------------- attention
def attention_rounding_allowance(case: Case) -> dict:
    """First-order error that rounding the attention scores and dp in floating point may cause, per output.

    Softmax attention is ill-conditioned in its scores: an absolute error ``e`` in a score changes
    its probability by a factor ``exp(e)``, and at scores of ~1e3 (inputs ~N(0, 30^2)) the rounding
    of q . k alone is ~1e-4. Any implementation that forms scores in the compute precision carries
    that error, so a single eager evaluation, which may get lucky (exactly 0 in a saturated row),
    is not a reliable yardstick there. This propagates, to first order and from the float64 values:

    - ``ds_ij <= (sqrt(dh) + 2) u scale |q_i| |k_j| + 16 u`` per score (the dot product, the scale,
      an exp accurate to ~16 ulp);
    - ``|dP_ij| <= P_ij (ds_ij + sum_k P_ik ds_ik)``, into o (``sum_j dP_ij |v_j - o_i|``), dv, and,
      with ``ddp_ij <= (sqrt(dh) + 1) u |do_i| |v_j|`` for ``dp = do . v`` and the same for the row
      term ``delta_i = do_i . o_i``, into ``ds = P (dp - delta)`` and so dq and dk.

    The last term is what the Triton backward documents (``nasfast.kernels.attention``): it forms
    ``delta`` as ``do . o``, two separately rounded dot products whose true difference is ~0 in a
    saturated row. ``u`` is the unit roundoff of the input dtype; row norms are 2-norms. Returns
    {output name: max allowance}; tensors of [B, h, T, T] are formed, so keep T small.
    """
    spec = case.spec
    q, k, v = case.values[:3]
    names = case.out_names
    if q.numel() == 0:
        return {n: 0.0 for n in names}
    m = case.values[3].to(torch.bool) if len(case.values) > 3 else None
    do = case.grad_values
    dh = q.shape[-1]
    scale = dh ** -0.5
    u = torch.finfo(spec.dtype).eps / 2
    root = math.sqrt(dh)
    with torch.no_grad():
        s = (q @ k.transpose(-1, -2)) * scale
        valid = torch.ones_like(s, dtype=torch.bool) if m is None else m[:, None, None, :].expand_as(s)
        p = torch.nan_to_num(s.masked_fill(~valid, float("-inf")).softmax(-1)) * valid
        o = p @ v
        nq, nk, nv, ndo, no = (t.norm(dim=-1) for t in (q, k, v, do, o))
        ds = (root + 2) * u * scale * nq[..., :, None] * nk[..., None, :] + 16 * u
        e = p * (ds + (p * ds).sum(-1, keepdim=True))                       # |dP| bound
        err_o = (e[..., None] * (v[..., None, :, :] - o[..., :, None, :]).abs()).sum(-2)
        err_dv = e.transpose(-1, -2) @ do.abs()
        dp = do @ v.transpose(-1, -2)
        delta = (do * o).sum(-1, keepdim=True)
        ddp = (root + 1) * u * ndo[..., :, None] * nv[..., None, :]
        ddelta = (root + 1) * u * ndo * torch.maximum(no, nv.max(-1, keepdim=True).values) + \
            (e * (dp - delta).abs()).sum(-1)
        f = e * (dp - delta).abs() + p * (ddp + ddelta[..., None])        # |d(ds)| bound
        err_dq = scale * (f @ k.abs())
        err_dk = scale * (f.transpose(-1, -2) @ q.abs())
    vals = {"o": err_o, "dq": err_dq, "dk": err_dk, "dv": err_dv}
    return {n: max_abs(vals[n]) for n in names}


def _attention_inputs(spec, rnd, gen):
    values = [rnd(spec.B, spec.heads, spec.T, spec.dh, scale=spec.scale) for _ in range(3)]
    return OpInputs(values, [True, True, True], lambda ops, q, k, v, *m: ops.attention(q, k, v, _mask(m)),
                    ["o", "dq", "dk", "dv"])


# Shapes and cases both attention ops are judged on (qkv_attention reads the same q/k/v packed in one
# [B, T, 3H] tensor); each op adds its own last regression and examples.
_ATTENTION_CASES = dict(
    masked=True,
    search=dict(heads=(1, 2, 3), dh=HEAD_DIMS),
    layout_base=dict(B=2, heads=3, T=13, dh=17, mask="mixed"),
)
_ATTENTION_REGRESSIONS = (dict(B=2, heads=2, T=7, dh=16, scale=5.0, mask="first"),
                          dict(B=2, heads=2, T=7, dh=16, scale=30.0))  # saturated softmax
_ATTENTION_EXAMPLES = (dict(B=3, heads=2, T=37, dh=24, mask="mixed"), dict(B=2, heads=3, T=7, dh=16),
                       dict(B=3, heads=1, T=7, dh=12, mask="mixed"))


def _attention_bench(s: dict) -> dict:
    return dict(B=s["B"], heads=s["heads"], T=s["T"], dh=s["H"] // s["heads"], mask="lengths")


register_op(FusedOp(
    "attention", reference.attention, _attention_inputs, lambda spec: ["q", "k", "v"],
    dims=lambda s: f"B{s.B} h{s.heads} T{s.T} dh{s.dh}",
    **_ATTENTION_CASES,
    regressions=(*_ATTENTION_REGRESSIONS, dict(B=3, heads=1, T=5, dh=8, mask="mixed", mask_dtype=torch.int32)),
    examples=_ATTENTION_EXAMPLES,
    bench=lambda s: (_attention_bench(s),
                     f"q[{s['B']},{s['heads']},{s['T']},{s['H'] // s['heads']}] masked"),
    allowance=attention_rounding_allowance,  # softmax rounding at large scores, the same for every backend
))


# -------------------------------------------------------------------------------- alignment_loss
def _alignment_inputs(spec, rnd, gen):
    L = spec.layers
    values = [rnd(spec.B, spec.T, spec.H, scale=spec.scale) for _ in range(2 * L)]

    def call(ops, *ts):
        return ops.alignment_loss(list(ts[:L]), list(ts[L:2 * L]), ts[2 * L] if len(ts) > 2 * L else None)

    return OpInputs(values, [True] * L + [False] * L, call, ["loss"] + [f"dh{i}" for i in range(L)])


register_op(FusedOp(
    "alignment_loss", reference.alignment_loss, _alignment_inputs,
    lambda spec: [f"h{i}" for i in range(spec.layers)] + [f"a{i}" for i in range(spec.layers)],
    masked=True, scalar_output=True,
    dims=lambda s: f"L{s.layers} B{s.B} T{s.T} H{s.H}",
    search=dict(layers=(1, 2, 3)),
    layout_base=dict(B=3, T=5, H=24, layers=2, mask="mixed"),
    regressions=(dict(B=0, T=5, H=8, layers=2),  # empty batch: 0, not NaN
                 dict(B=2, T=5, H=8, layers=1, mask="mixed", mask_dtype=torch.int64)),
    examples=(dict(B=3, T=37, H=72, layers=3, mask="mixed"), dict(B=2, T=7, H=24, layers=2)),
    bench=lambda s: (dict(B=s["B"], T=s["T"], H=s["H"], layers=s["layers"], mask="lengths"),
                     f"{s['layers']} x [{s['B']},{s['T']},{s['H']}] masked"),
))


# ---------------------------------------------------------------------------------------- linear
# Registered after the original five so their cases keep their identities; out features = spec.dh.
def _linear_inputs(spec, rnd, gen):
    rows = _rows(spec)
    values = [rnd(*rows, scale=spec.scale), rnd(spec.dh, spec.H, scale=max(spec.H, 1) ** -0.5), rnd(spec.dh)]
    return OpInputs(values, [True, True, True], lambda ops, x, w, b: ops.linear(x, w, b),
                    ["y", "dx", "dweight", "dbias"], out_shape=(*rows[:-1], spec.dh))


register_op(FusedOp(
    "linear", reference.linear, _linear_inputs, lambda spec: ["x", "weight", "bias"],
    dims=lambda s: f"B{s.B} T{s.T} K{s.H} N{s.dh}",
    search=dict(dh=(1, 3, 16, 17, 40)),
    layout_base=dict(B=2, T=5, H=24, dh=8),
    examples=(dict(B=3, T=37, H=72, dh=40), dict(B=1, T=7, H=24, dh=5, flat=True), dict(B=2, T=1, H=1, dh=3),
              dict(B=4, T=33, H=17, dh=96)),
    bench=lambda s: (dict(B=s["B"], T=s["T"], H=s["H"], dh=s["ffn"]), f"x[{s['B']},{s['T']},{s['H']}] -> {s['ffn']}"),
))


# --------------------------------------------------------------------------------- qkv_attention
def _qkv_attention_inputs(spec, rnd, gen):
    H = spec.heads * spec.dh
    values = [rnd(spec.B, spec.T, 3 * H, scale=spec.scale)]
    return OpInputs(values, [True], lambda ops, qkv, *m: ops.qkv_attention(qkv, spec.heads, _mask(m)),
                    ["o", "dqkv"], out_shape=(spec.B, spec.T, H))


def _qkv_attention_allowance(case):
    """attention_rounding_allowance on the unpacked q, k, v [B, h, T, dh] and output gradient; d(qkv)
    gets the largest of the dq, dk, dv bounds."""
    import dataclasses

    spec = case.spec
    B, T, h, dh = spec.B, spec.T, spec.heads, spec.dh
    q, k, v = case.values[0].view(B, T, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
    do = case.grad_values.view(B, T, h, dh).transpose(1, 2) if case.grad_values is not None else None
    unpacked = dataclasses.replace(case, values=[q, k, v, *case.values[1:]], grad_values=do,
                                   out_names=["o", "dq", "dk", "dv"], allowance=None)
    bound = attention_rounding_allowance(unpacked)
    return {"o": bound["o"], "dqkv": max(bound["dq"], bound["dk"], bound["dv"])}


register_op(FusedOp(
    "qkv_attention", reference.qkv_attention, _qkv_attention_inputs, lambda spec: ["qkv"],
    dims=lambda s: f"B{s.B} T{s.T} h{s.heads} dh{s.dh}",
    **_ATTENTION_CASES,
    regressions=(*_ATTENTION_REGRESSIONS, dict(B=3, heads=1, T=1, dh=8, mask="mixed")),
    examples=(*_ATTENTION_EXAMPLES, dict(B=2, heads=4, T=70, dh=8, mask="mixed")),
    bench=lambda s: (_attention_bench(s),
                     f"qkv[{s['B']},{s['T']},{3 * s['H']}] h={s['heads']} masked"),
    allowance=_qkv_attention_allowance,
))


# --------------------------------------------------------------------------------------- dropout
# The embeddings' dropout (after their LayerNorm).
def _dropout_inputs(spec, rnd, gen):
    shape = _rows(spec)
    values, diff = [rnd(*shape, scale=spec.scale)], [True]
    p, training = spec.dropout, spec.training
    if p > 0:  # an explicit keep mask: every backend drops the same positions
        values.append(torch.rand(*shape, generator=gen) >= p)
        diff.append(False)

        def call(ops, x, keep):
            return ops.dropout(x, p, training, keep)
    else:
        def call(ops, x):
            return ops.dropout(x, 0.0, training)
    return OpInputs(values, diff, call, ["y", "dx"])


def _dropout_bench(s):
    p = s["dropout"]
    shape = f"x[{s['B']},{s['T']},{s['H']}] p={p:g}"
    if s["keep_mask"]:
        return dict(B=s["B"], T=s["T"], H=s["H"], dropout=p), shape
    return dict(B=s["B"], T=s["T"], H=s["H"]), shape, lambda ops, x: ops.dropout(x, p, True)


register_op(FusedOp(
    "dropout", reference.dropout, _dropout_inputs,
    lambda spec: ["x"] + (["keep_mask"] if spec.dropout > 0 else []),
    search=dict(dropout=(0.0, 0.1, 0.5)),
    layout_base=dict(B=2, T=3, H=40, dropout=0.25),
    examples=(dict(B=3, T=37, H=72, dropout=0.1), dict(B=1, T=7, H=24, flat=True, dropout=0.3),
              dict(B=2, T=5, H=48, dropout=0.3, training=False)),
    bench=_dropout_bench,
))


# --------------------------------------------------------------------------------- cross_entropy
# The MLM loss over the masked positions: logits [M, V] with M = B * T rows and V = H classes.
# Registered after dropout: the other ops' cases keep their identities.
def _cross_entropy_inputs(spec, rnd, gen):
    M, V = spec.B * spec.T, spec.H
    values = [rnd(M, V, scale=2.0 * spec.scale), torch.randint(0, V, (M,), generator=gen)]
    return OpInputs(values, [True, False], lambda ops, x, t: ops.cross_entropy(x, t), ["loss", "dlogits"])


def _cross_entropy_bench(s):
    M = max(1, round(0.15 * s["B"] * s["T"]))  # the ~15% masked positions the MLM head projects
    return dict(B=M, T=1, H=s["vocab"]), f"logits[{M},{s['vocab']}]"


register_op(FusedOp(
    "cross_entropy", reference.cross_entropy, _cross_entropy_inputs, lambda spec: ["logits", "targets"],
    scalar_output=True,
    dims=lambda s: f"M{s.B * s.T} V{s.H}",
    layout_base=dict(B=2, T=5, H=40),
    regressions=(dict(B=0, T=5, H=8),  # no masked token: 0, not NaN
                 dict(B=3, T=1, H=1)),  # one class: loss 0, zero gradient
    examples=(dict(B=3, T=37, H=72), dict(B=1, T=7, H=8191), dict(B=2, T=5, H=17, scale=30.0)),
    bench=_cross_entropy_bench,
))
