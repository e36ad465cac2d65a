"""Shared benchmark cases: one realistic call per registered fused op at the tiny and base widths.

Baselines are the eager references (nasfast.kernels.reference, via nasfast.kernels.registry); the fused side
is nasfast.kernels.native. ``make_case(op, width)`` returns fresh inputs (from the shared generator
``nasfast.kernels.cases.bench_inputs``, at the op's registered benchmark case) and a
``run(ops, backward)`` closure. ``OPS``: every registered op, so a new op is benchmarked too.
Shapes follow configs tiny (H=128, B=32, T=128, ffn 4H, 4 heads, 6 layers) and base (H=768,
12 heads, 24 layers) at a smaller B*T (B=4, T=128) so the base cases run in seconds on a 2-core CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.harness import describe as _describe  # importing it tunes malloc before anything is timed
from nasfast.kernels.cases import bench_inputs
from nasfast.kernels.registry import op_names

OPS = op_names()  # every registered op (re-exported for the bench scripts)

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


def make_case(op: str, width: str) -> Case:
    """Inputs from the shared generator (nasfast.kernels.cases); dropout draws its own pattern."""
    w = WIDTHS[width]
    B, T, H = w["B"], w["T"], w["H"]
    shape, inputs, bound = bench_inputs(op, B, T, H, heads=w["heads"], layers=w["layers"], ffn=4 * H,
                                        dtype=torch.float32, device="cpu", k=CONV_K, dropout=DROPOUT_P, keep_mask=False)
    call = lambda ops: bound(ops, *inputs)  # noqa: E731

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
    return _describe()