"""CLI behaviour: help, and one clear line with exit status 2 for every kind of bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from nasfast.cli.app import main
from nasfast.training.checkpointer import CHECKPOINT
from nasfast.training.checkpointer import raw_checkpoint as load

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def nasfast(*args, **kw):
    return subprocess.run([sys.executable, "-m", "nasfast", *args], capture_output=True, text=True, env=ENV, **kw)


@pytest.mark.slow
def test_help():
    res = nasfast("--help")
    assert res.returncode == 0 and "pretrain" in res.stdout and "space" in res.stdout
    res = nasfast("pretrain", "--help")
    assert res.returncode == 0 and "--resume" in res.stdout and "--set" in res.stdout


def expect_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, micro_yaml):
    out = str(tmp_path / "run")
    expect_error(capsys, ["pretrain", "--config", str(tmp_path / "missing.yaml"), "--out", out], "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [steps: 3\n")
    expect_error(capsys, ["pretrain", "--config", str(bad), "--out", out], "not valid YAML")
    expect_error(capsys, ["pretrain", "--config", str(micro_yaml), "--out", out, "--set", "train.stepz=3"], "train.stepz")
    expect_error(capsys, ["pretrain", "--config", str(micro_yaml), "--out", out, "--set", "optim.lr=3"], "optim")
    expect_error(capsys, ["pretrain", "--config", str(micro_yaml), "--out", out, "--set", "train.steps=-1"], "train.steps")
    expect_error(capsys, ["pretrain", "--config", str(micro_yaml), "--out", out, "--set", "train.lr=fast"], "train.lr")
    expect_error(capsys, ["pretrain", "--config", str(micro_yaml), "--out", out, "--set", "space.candidates=[mha:2, lstm:3]"], "lstm:3")
    expect_error(capsys, ["pretrain", "--config", str(micro_yaml), "--out", out, "--sampler", "darts"], "sampler.name")
    expect_error(capsys, ["space", "--config", str(micro_yaml), "--arch", "mha:2|ffn:40"], "has 2 layers")
    expect_error(capsys, ["space", "--config", str(micro_yaml), "--arch", "mha:2|ffn:99|identity"], "ffn:99")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    expect_error(capsys, ["pretrain", "--config", str(micro_yaml), "--out", out, "--set", f"data.corpus=[{empty}]"], "empty")
    expect_error(capsys, ["pretrain", "--out", str(tmp_path / "never"), "--resume"], "config.yaml")
    expect_error(capsys, ["pretrain", "--out", out, "--resume"], "no checkpoint")


def test_space_command(micro_yaml, capsys):
    assert main(["space", "--config", str(micro_yaml), "--arch", "mha:2|ffn:40|identity"]) == 0
    assert "params=" in capsys.readouterr().out


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)


def start(micro_yaml, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "nasfast", "pretrain", "--config", str(micro_yaml), "--out", str(out), "--no-progress",
         "--set", "train.steps=100000", "--set", "train.ckpt_every=1", "--set", "train.eval_every=1000", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )


@pytest.mark.slow
def test_sigkill_never_leaves_a_broken_checkpoint(tmp_path, micro_yaml):
    out = tmp_path / "run"
    rng = random.Random()
    for attempt in range(3):
        proc = start(micro_yaml, out, *(["--resume"] if attempt else []))
        ckpt = out / CHECKPOINT
        if attempt == 0:
            wait_for(ckpt, proc)
        time.sleep(rng.uniform(0.5, 3.0))
        proc.kill()
        proc.wait()
        state = load(ckpt)  # must always load
        assert state["step"] >= 1 and "model" in state and "optimizer" in state
    proc = start(micro_yaml, out, "--resume", "--stop-after", "1")  # resuming clears temp files of killed writers
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert [p.name for p in (out / CHECKPOINT).parent.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(tmp_path, micro_yaml):
    out = tmp_path / "run"
    proc = start(micro_yaml, out)
    wait_for(out / CHECKPOINT, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted by SIGTERM"
    assert load(out / CHECKPOINT)["step"] == summary["step"]


def test_set_parses_yaml_values():
    from nasfast.config import load_config

    cfg = load_config(None, ["train.lr=3e-3", "train.bf16=true", "space.candidates=[mha:2, identity]", "data.max_chars_per_file=null"])
    assert cfg.train.lr == 0.003 and cfg.train.bf16 is True
    assert cfg.space.candidates == ["mha:2", "identity"] and cfg.data.max_chars_per_file is None
