"""What a user installs: nothing at the repo root shadows another distribution, and the built wheel
(not the editable checkout) holds everything the commands need."""
from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import MICRO_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NASFAST_CSRC")}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _python(code: str, cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, env=ENV)


def test_repo_root_holds_no_importable_package_but_nasfast():
    # `python -m ...`, torchrun and the DeepSpeed launcher put the working directory first on
    # sys.path: a regular package or module there wins over any installed distribution of that name
    # (transformers 5.25 imports Hugging Face's `kernels`, which our kernels/ folder shadowed). Folders
    # without __init__.py are namespace portions, which every installed regular package beats.
    importable = sorted(p.name for p in REPO.iterdir()
                        if (p.suffix == ".py" and p.is_file()) or (p.is_dir() and (p / "__init__.py").exists()))
    assert importable == ["nasfast"], importable


def test_kernels_from_the_repo_root_is_the_installed_distribution():
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    origin = _python(probe, cwd=REPO).stdout.strip()
    if importlib.util.find_spec("kernels", None) is not None and origin not in ("None", ""):
        # Hugging Face kernels installed (transformers >= 5.25 depends on it): it must be what loads
        assert "site-packages" in origin and not origin.startswith(str(REPO / "kernels")), origin
    else:  # not installed: at most our folder as an empty namespace, never a module with code
        assert origin in ("None", ""), origin


@pytest.mark.slow
def test_python_dash_m_nasfast_works_from_the_repo_root():
    out = subprocess.run([sys.executable, "-m", "nasfast", "--help"], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and "pretrain" in out.stdout, out.stderr
    # the import that failed when kernels/ shadowed Hugging Face's package
    out = _python("import nasfast.nas.hf_model, transformers.modeling_utils; print('ok')", cwd=REPO)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_packaging_maps_kernels_under_nasfast(tmp_path):
    from importlib.metadata import entry_points

    probe = "import nasfast.kernels.reference, nasfast.analysis.ranking; print('ok')"
    out = _python(probe, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("nasfast") == "nasfast.cli:main"


def _subcommands() -> list[str]:
    import argparse

    from nasfast.cli.app import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed non-editable into a fresh venv. Its
    dependencies come from this interpreter's site-packages through a .pth line (a path added that
    way is not scanned for .pth files, so the editable install of the checkout stays invisible)."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True, text=True, env=ENV)
    wheel = next(dist.glob("nasfast-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]) if Path(p).is_dir()]
    (purelib / "_nasfast_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, text=True, env=ENV)
    return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(wheel_venv, tmp_path):
    bin_dir = wheel_venv / "bin"
    python = str(bin_dir / "python")

    def run(*args, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(a) for a in args], cwd=tmp_path, capture_output=True, text=True, env=ENV)
        assert out.returncode == 0 or not ok, f"{args}: {out.stderr[-2000:]}"
        return out

    where = run(python, "-c", "import json, nasfast, nasfast.analysis, nasfast.kernels.reference as r; "
                              "from importlib import resources as res; "
                              "print(json.dumps([nasfast.__file__, r.__file__, "
                              "sorted(p.name for p in res.files('nasfast.csrc').iterdir()), "
                              "sorted(p.name for p in res.files('nasfast.corpus').iterdir()), "
                              "sorted(p.name for p in res.files('nasfast.tasks').iterdir())]))").stdout
    init, ref, csrc, corpus, tasks = json.loads(where)
    assert init.startswith(str(wheel_venv)) and ref.startswith(str(wheel_venv)), (init, ref)
    assert {"registry.cpp", "common.h"} <= set(csrc) and any(n.endswith(".gz") for n in corpus), (csrc, corpus)
    assert any(n.startswith("mr_sentiment") for n in tasks), tasks

    assert "pretrain" in run(bin_dir / "nasfast", "--help").stdout
    assert "pretrain" in run(python, "-m", "nasfast", "--help").stdout
    for command in _subcommands():
        assert "usage:" in run(bin_dir / "nasfast", command, "--help").stdout, command

    from nasfast.config import load_config, save_config

    save_config(load_config(None, MICRO_OVERRIDES + ["train.steps=4", "kernels.backend=native"]), tmp_path / "micro.yaml")
    run(bin_dir / "nasfast", "pretrain", "--config", "micro.yaml", "--out", "run", "--no-progress")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["fused_ops"], summary  # C++ ops built from the wheel's csrc
    run(bin_dir / "nasfast", "sample-archs", "--config", "run/config.yaml", "--n", "4", "--seed", "0", "--out", "archs.txt")
    run(bin_dir / "nasfast", "evaluate", "--run", "run", "--archs", "archs.txt", "--dev-batches", "2", "--no-progress")
    run(bin_dir / "nasfast", "ground-truth", "--run", "run", "--archs", "archs.txt", "--steps", "2", "--dev-batches", "2",
        "--out", "gt", "--no-progress")
    printed = run(bin_dir / "nasfast", "rank", "--estimates", "run/estimates.json", "--truth", "gt", "--out", "rank").stdout
    assert "Kendall tau" in printed and (tmp_path / "rank" / "rank.json").exists()
