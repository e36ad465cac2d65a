"""pytest-benchmark suite: native C++ ops vs eager, per op, forward+backward, tiny and base widths.

Run: ``OMP_NUM_THREADS=2 pytest benchmarks/test_bench_native.py --benchmark-group-by=param:op,param:width``
Timings never decide pass/fail; the only assertions are that the cases run.
"""
from __future__ import annotations

import pytest

from benchmarks.bench_cases import OPS, WIDTHS, make_case
from nasfast.kernels.registry import get_ops


@pytest.fixture(scope="module")
def opsets():
    import nasfast.kernels.native as native

    if not native.available():
        pytest.skip(f"native ops unavailable: {native.why_unavailable()}")
    return {"eager": get_ops("eager"), "native": get_ops("native")}


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("op", OPS)
def test_fwd_bwd(benchmark, opsets, op, width, backend):
    if op not in opsets["native"].fused:
        pytest.skip(f"the native backend does not implement {op}")
    case = make_case(op, width)
    ops = opsets[backend]
    benchmark.group = f"{op}-{width}"
    benchmark.extra_info["shape"] = case.shape
    benchmark.pedantic(case.run, args=(ops, True), rounds=10, iterations=1, warmup_rounds=2)
