"""The CPU-side parts of benchmarks/gpu_suite.py: argument parsing, machine description, result files."""
import csv
import importlib
from collections import Counter

import pytest


@pytest.fixture(scope="module")
def suite():
    return importlib.import_module("benchmarks.gpu_suite")  # a package module, as `python -m benchmarks.gpu_suite` runs it


def test_parse_args_defaults_and_subsets(suite, tmp_path):
    a = suite.parse_args([])
    assert a.ops == list(suite.OPS) and a.widths == ["tiny", "base"] and a.dtype == "bf16" and not a.quick
    assert a.out.name.startswith("gpu-")
    a = suite.parse_args(["--out", str(tmp_path), "--quick", "--ops", "attention, bias_gelu", "--dtype", "fp16",
                          "--widths", "tiny"])
    assert a.out == tmp_path and a.quick and a.ops == ["attention", "bias_gelu"] and a.dtype == "fp16"
    assert a.widths == ["tiny"]


@pytest.mark.parametrize("argv", [["--ops", "softmax"], ["--ops", ""], ["--dtype", "int8"], ["--widths", "huge"]])
def test_parse_args_rejects_bad_values(suite, argv, capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(argv)
    assert "usage" in capsys.readouterr().err


def test_machine_description_without_cuda(suite):
    info = suite.machine_description()
    for key in ("python", "torch", "triton", "gpu", "platform"):
        assert key in info
    assert suite.command_line(["--quick"]) == "python -m benchmarks.gpu_suite --quick"


def test_write_results(suite, tmp_path):
    rows = [
        suite.Row("correctness", "bias_gelu", "small", "x[3,37,200]", "bfloat16", "triton", "out",
                  max_err=1e-3, eager_err=2e-3, ok=True),
        suite.Row("kernel", "attention", "base", "q[32,12,512,64]", "bf16", "eager", "fwd", 2.0, 1.9, 2.1, 512.0),
        suite.Row("kernel", "attention", "base", "q[32,12,512,64]", "bf16", "triton", "fwd", 0.5, 0.49, 0.52, 128.0, 4.0),
        suite.Row("step", "supernet", note="skipped: nasfast.space.supernet not importable"),
    ]
    machine = {"gpu": "NVIDIA H200", "torch": "2.x", "triton": "3.x"}
    csv_path, md_path = suite.write_results(rows, tmp_path / "out", machine, "python gpu_suite.py --quick")
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert len(got) == 4 and list(got[0]) == list(suite.CSV_FIELDS)
    assert got[2]["impl"] == "triton" and float(got[2]["speedup_vs_eager"]) == 4.0
    md = md_path.read_text()
    assert "NVIDIA H200" in md and "python gpu_suite.py --quick" in md
    assert "## Correctness" in md and "## Kernel timings" in md and "## Supernet training step" in md
    assert "| attention | base | q[32,12,512,64] | bf16 | fwd | triton | 0.500 |" in md


def test_main_without_cuda_exits_cleanly(suite, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA: main would run the suite")
    assert suite.main(["--out", str(tmp_path / "x"), "--quick"]) == 2
    assert not (tmp_path / "x").exists()


def test_correctness_covers_every_layout_of_every_argument(suite):
    """The correctness section gives every tensor argument of every op (weights and biases
    included) and the incoming gradient each non-contiguous layout at least once."""
    import torch

    from nasfast.kernels import cases
    from nasfast.kernels.registry import get_op

    specs = suite.correctness_specs(list(suite.OPS), torch.float32)
    assert {s.op for s in specs} == set(suite.OPS)
    for op in suite.OPS:
        mine = [s for s in specs if s.op == op]
        # the argument list of most of the op's cases (e.g. LayerNorm with its keep mask)
        names = Counter(tuple(s.arg_names()) for s in mine).most_common(1)[0][0]
        for i, name in enumerate(names):
            for layout in cases.LAYOUTS[1:]:
                assert any(tuple(s.arg_names()) == names and s.layout_of(i) == layout for s in mine), (op, name, layout)
        if not get_op(op).scalar_output:  # a loss's incoming gradient is a scalar: no layout
            assert {s.grad_layout for s in mine} >= set(cases.LAYOUTS), op


@pytest.mark.slow
def test_check_correctness_runs_through_the_interpreter(suite):
    """The GPU correctness path, run on the CPU through the Triton interpreter for one op."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA: the suite itself runs this on the GPU")
    rows = []
    assert suite.check_correctness(["bias_gelu"], rows, device="cpu"), [r.note for r in rows if not r.ok]
    n = len(suite.correctness_specs(["bias_gelu"], torch.float32))
    assert len(rows) == 3 * n and all(r.section == "correctness" and r.ok for r in rows)
    assert {r.dtype for r in rows} == {"float32", "float16", "bfloat16"}
