"""The first hour of a new user (issue 29, classes 5, 6 and 9): the README and --help are complete and true,
long work says where it is, and an exported model behaves like a transformers model."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MICRO_OVERRIDES
from runhelpers import cli

from nasfast.cli.app import build_parser, main
from nasfast.config import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
USER_TEXT = "\n".join([README, (ROOT / "CONTRIBUTING.md").read_text(), *DOCS.values()])  # what users read


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _synopsis() -> dict[str, str]:
    """docs/cli.md's synopsis, one text per subcommand (its line and continuation lines)."""
    block = DOCS["cli.md"].split("```", 2)[1]
    groups: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        head = re.match(r"nasfast ([a-z-]+)", line)
        if head and head.group(1) in _subcommands():
            current = head.group(1)
        if current is not None and line.strip():
            groups[current] = groups.get(current, "") + line + "\n"
    return groups


def _code_lines(text: str = USER_TEXT) -> list[str]:
    return [l for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S) for l in block.splitlines()]


# --- class 5: README and help are correct and complete -------------------------------------------------
def test_every_option_of_every_subcommand_is_in_its_help_and_the_synopsis():
    synopsis = _synopsis()
    missing = []
    for name, parser in _subcommands().items():
        help_text = parser.format_help()
        for action in parser._actions:
            for opt in action.option_strings:
                if not opt.startswith("--") or opt == "--help":
                    continue
                if opt not in help_text:
                    missing.append(f"{name} {opt} (--help)")
                if not re.search(re.escape(opt) + r"(?![\w-])", synopsis.get(name, "")):
                    missing.append(f"{name} {opt} (docs/cli.md synopsis)")
    assert not missing, missing


def test_the_docs_describe_configs_tiny_as_it_is():
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    said = re.search(r"`configs/tiny\.yaml` is the CPU default \(H=(\d+), (\d+) layers, (\d+) candidates, "
                     r"vocab (\d+), (\d+) steps of\s+(\d+) x (\d+) tokens", DOCS["configuration.md"])
    assert said, "docs/configuration.md lost its description of configs/tiny.yaml"
    assert [int(g) for g in said.groups()] == [
        tiny["model"]["hidden"], tiny["space"]["layers"], len(tiny["space"]["candidates"]), tiny["data"]["vocab_size"],
        tiny["train"]["steps"], tiny["train"]["batch_size"], tiny["data"]["block_size"]]


def test_every_install_line_uses_the_venv_and_the_lock():
    installs = [l for l in _code_lines() if re.search(r"\bpip install\b", l)]
    assert len(installs) >= 4  # the two README commands, DeepSpeed's, CONTRIBUTING's
    for line in installs:
        assert ".venv/bin/pip install -c .ci/constraints.txt torch==2.13.0" in line, line


def test_the_pipeline_finetune_uses_the_defaults_the_text_recommends():
    line = next(l for l in _code_lines(README) if l.startswith("nasfast finetune --model models/"))
    args = build_parser().parse_args(shlex.split(line)[1:])
    defaults = build_parser().parse_args(["finetune", "--model", "m", "--task", "sentiment", "--out", "o"])
    for key in ("steps", "epochs", "lr", "batch_size", "max_len", "evals"):
        assert getattr(args, key) == getattr(defaults, key), key
    recommended = re.search(r"\(`--steps`, default (\d+), at `--lr` ([0-9e.-]+)", DOCS["nas.md"])
    assert recommended, "docs/nas.md lost the finetune defaults"
    from nasfast.nas.finetune import FinetuneSettings

    settings = FinetuneSettings()
    assert int(recommended.group(1)) == settings.steps and float(recommended.group(2)) == settings.lr


def test_every_environment_variable_nasfast_reads_is_documented():
    sources = [*ROOT.glob("nasfast/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("csrc/*")]
    read = set()
    for path in sources:
        read |= set(re.findall(r"(?:environ(?:\.get)?[\[(]|getenv\()\s*\"(NASFAST_[A-Z_]+)\"", path.read_text()))
    assert {"NASFAST_BUILD_DIR", "NASFAST_CACHE", "NASFAST_NATIVE_GEMM"} <= read  # the scan finds py and C++ reads
    table = DOCS["cli.md"].split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    assert not [v for v in sorted(read) if f"`{v}`" not in table]


def test_the_example_output_folders_are_git_ignored():
    outs = {m for m in re.findall(r"--out ([a-z][\w./-]*)", USER_TEXT) if not m.startswith("benchmarks/")}
    assert {"models/searched", "ft/searched-sentiment", "runs/tiny"} <= outs
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outs)], cwd=ROOT, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(outs), ignored


@pytest.mark.slow
def test_a_short_run_uses_the_default_warmup_with_one_notice(tmp_path, micro_config):
    """--set train.steps=3 with a longer warm-up trains (a tenth of the run warms up), in pretrain and
    ground-truth alike; it used to be refused."""
    from nasfast.training.optim import lr_lambda

    micro_config.train.warmup_steps = 30
    save_config(micro_config, tmp_path / "micro.yaml")
    res = cli("pretrain", "--config", tmp_path / "micro.yaml", "--out", tmp_path / "run", "--set", "train.steps=3",
              "--set", "train.eval_every=3", "--no-progress", timeout=300)
    assert res.returncode == 0, res.stderr
    notices = [l for l in res.stderr.splitlines() if "warmup_steps" in l]
    assert notices == ["nasfast: warning: train.warmup_steps=30 is more than the 3 training steps; "
                       "warming up for 0 steps (a tenth of the run)"], res.stderr
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    f = lr_lambda(0, 3, micro_config.train.min_lr_ratio)
    assert lrs == pytest.approx([micro_config.train.lr * f(s) for s in range(3)])
    (tmp_path / "archs.txt").write_text("mha:2|ffn:40|identity\nconv:3|mha:3|conv:5\n")
    res = cli("ground-truth", "--run", tmp_path / "run", "--archs", tmp_path / "archs.txt", "--steps", "20",
              "--dev-batches", "1", "--out", tmp_path / "gt", "--no-progress", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "warming up for 2 steps (a tenth of the run)" in res.stderr  # 30 > 20: the same rule
    proto = json.loads((tmp_path / "gt" / "protocol.json").read_text())
    assert proto["train"]["warmup_steps"] == 2
    # class 6: one line per child with an ETA, with --no-progress too
    lines = [l for l in res.stdout.splitlines() if l.startswith("ground truth ")]
    assert len(lines) == 2 and lines[0].startswith("ground truth 1/2: mha:2|ffn:40|identity loss ") and "ETA " in lines[0]
    assert lines[1].endswith("ETA done"), lines


# --- class 6: progress where people wait -------------------------------------------------------------------
def test_the_native_build_says_when_it_starts_and_ends(tmp_path, monkeypatch, capsys):
    """The compile itself is tested by tests/test_native_ops.py; here only what a fresh build prints, with the
    compiler replaced by a stand-in that writes the library (a real build takes minutes)."""
    from torch.utils import cpp_extension

    from nasfast.kernels import native_build

    built = []

    def fake_load(name, build_directory, **kw):
        built.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setenv("NASFAST_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    native_build._build()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("nasfast: compiling the native C++ ops once") and str(tmp_path) in err[0]
    assert re.fullmatch(r"nasfast: native C\+\+ ops built in \d+ s \(cached for later runs\)", err[1]), err
    native_build._build()  # built: ninja would find nothing to do, and nothing is said
    assert capsys.readouterr().err == "" and len(built) == 2


# --- class 9: exported models behave like transformers models ----------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from nasfast.training.trainer import Trainer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    Trainer(load_config(None, MICRO_OVERRIDES + ["train.steps=2"]), root / "run", progress=False).train()
    assert main(["export", "--run", str(root / "run"), "--arch", "mha:2|conv:3|ffn:40", "--out", str(root / "model")]) == 0
    return root


def test_output_attentions_raises_a_clear_error_instead_of_none(exported):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    ids = torch.randint(5, 100, (2, 7))
    for auto in (AutoModelForMaskedLM, AutoModelForSequenceClassification):
        model = auto.from_pretrained(str(exported / "model")).eval()
        assert model(ids, output_hidden_states=True).hidden_states is not None
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            model(ids, output_attentions=True)
        model.config.output_attentions = True  # the config route, as pipelines set it
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            model(ids)


def test_the_exported_config_names_its_source_run(exported):
    import hashlib

    source = json.loads((exported / "model" / "config.json").read_text())["nasfast_source"]
    run = exported / "run"
    assert source["run"] == str(run.resolve()) and Path(source["run"]).is_absolute()
    assert source["checkpoint_sha1"] == hashlib.sha1((run / "checkpoints" / "last.pt").read_bytes()).hexdigest()
