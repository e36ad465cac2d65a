"""Shared benchmark cases: one realistic call per fused op at the tiny and base widths.

Baselines are the eager references (nasfast.kernels.reference, via nasfast.backend); the fused side
is nasfast.native. ``make_case(op, width)`` returns fresh inputs and a ``run(ops, backward)`` closure.
Shapes follow configs tiny (H=128, B=32, T=128, ffn 4H, 4 heads, 6 layers) and base (H=768,
12 heads, 24 layers) at a smaller B*T (B=4, T=128) so the base cases run in seconds on a 2-core CPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

OPS = ("bias_gelu", "add_dropout_layernorm", "dwconv_bias_gelu", "attention", "alignment_loss")
WIDTHS = {
    "tiny": dict(B=32, T=128, H=128, heads=4, layers=6),
    "base": dict(B=4, T=128, H=768, heads=12, layers=24),
}
CONV_K = 5
DROPOUT_P = 0.1


@dataclass
class Case:
    op: str
    width: str
    shape: str
    run: Callable  # run(ops, backward: bool) -> None


def _mask(B, T):
    """Realistic padding: lengths from T/2 to T (row 0 full)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    return torch.arange(T)[None, :] < lengths[:, None]


def make_case(op: str, width: str) -> Case:
    w = WIDTHS[width]
    B, T, H = w["B"], w["T"], w["H"]
    torch.manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).requires_grad_()

    mask = _mask(B, T)
    if op == "bias_gelu":
        x, b = leaf(B, T, 4 * H), leaf(4 * H)
        inputs, shape = (x, b), f"x[{B},{T},{4 * H}]"
        call = lambda ops: ops.bias_gelu(x, b)  # noqa: E731
    elif op == "add_dropout_layernorm":
        x, r, g, b = leaf(B, T, H), leaf(B, T, H), leaf(H), leaf(H)
        inputs, shape = (x, r, g, b), f"x[{B},{T},{H}] p={DROPOUT_P} train"
        call = lambda ops: ops.add_dropout_layernorm(x, r, g, b, DROPOUT_P, True)  # noqa: E731
    elif op == "dwconv_bias_gelu":
        x, cw, cb = leaf(B, T, H), leaf(H, CONV_K, scale=0.3), leaf(H)
        inputs, shape = (x, cw, cb), f"x[{B},{T},{H}] k={CONV_K} masked"
        call = lambda ops: ops.dwconv_bias_gelu(x, cw, cb, mask)  # noqa: E731
    elif op == "attention":
        nh = w["heads"]
        q, k, v = (leaf(B, nh, T, H // nh) for _ in range(3))
        inputs, shape = (q, k, v), f"q[{B},{nh},{T},{H // nh}] masked"
        call = lambda ops: ops.attention(q, k, v, mask)  # noqa: E731
    elif op == "alignment_loss":
        L = w["layers"]
        hs = [leaf(B, T, H) for _ in range(L)]
        anchors = [torch.randn(B, T, H) for _ in range(L)]
        inputs, shape = tuple(hs), f"{L} x [{B},{T},{H}] masked"
        call = lambda ops: ops.alignment_loss(hs, anchors, mask)  # noqa: E731
    else:
        raise ValueError(op)

    grad_cache: dict = {}

    def run(ops, backward: bool) -> None:
        for t in inputs:
            t.grad = None
        if not backward:
            with torch.no_grad():
                call(ops)
            return
        out = call(ops)
        g = grad_cache.get(out.shape)
        if g is None:
            g = grad_cache[out.shape] = torch.randn_like(out)
        out.backward(g)

    return Case(op, width, shape, run)


def machine() -> dict:
    """CPU model, core counts, torch version and threads, for the results files."""
    from machine import describe

    return describe()