"""Fault injection: SIGKILL a real ``nasfast pretrain`` across the whole life of a run, resume each time.

Named kill points (``NASFAST_KILL_AT``, nasfast/faults.py) land kills inside windows too narrow for
timing alone (between a temp file's fsync and its rename; after the final checkpoint); kills at
random times cover the rest. After every kill the folder must load, metrics.jsonl must hold every
step up to the checkpoint exactly once, summary.json must be absent or complete, and at the end the
parameters must equal those of an uninterrupted run bit for bit.
"""
import json
import random
import signal
import time

import pytest
import torch
from runhelpers import cli, popen

from nasfast.training.checkpointer import CHECKPOINT, read_checkpoint

STEPS = 10
ARGS = ["--no-progress", "--set", f"train.steps={STEPS}", "--set", "train.ckpt_every=3", "--set", "train.eval_every=5"]
KEYS = ("step", "loss", "lr", "grad_norm", "child", "dev")


def metrics_lines(path):
    """Complete lines of metrics.jsonl (a last line without its newline was torn by the kill)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")[:-1]  # drops "" after the last newline, or the torn tail
    return [json.loads(l) for l in lines]


def check_folder(out, reference, note):
    """The invariants that must hold after any kill."""
    ckpt_step = read_checkpoint(out / CHECKPOINT)["step"] if (out / CHECKPOINT).exists() else 0
    records = metrics_lines(out / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(steps) + 1)), (note, steps)  # none lost, none duplicated
    assert len(steps) >= ckpt_step, (note, steps, ckpt_step)  # every step up to the checkpoint is on record
    for r in records:
        assert {k: r.get(k) for k in KEYS} == {k: reference[r["step"] - 1].get(k) for k in KEYS}, note
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        assert {"status", "step", "steps", "dev"} <= summary.keys(), note
    return ckpt_step


def run_once(out, micro_yaml, kill):
    """One ``pretrain`` invocation (fresh or --resume), SIGKILLed at a named point or after ``kill`` seconds."""
    resume = (out / CHECKPOINT).exists()
    argv = ["pretrain", "--out", out, "--resume"] if resume else ["pretrain", "--config", micro_yaml, "--out", out]
    if isinstance(kill, str):
        proc = cli(*argv, *ARGS, env={"NASFAST_KILL_AT": kill})
        return proc.returncode, f"kill at {kill!r} (resume={resume}): rc {proc.returncode}, {proc.stderr[-500:]}"
    proc = popen(*argv, *ARGS)
    time.sleep(kill)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    return proc.returncode, f"kill after {kill:.2f} s (resume={resume}): rc {proc.returncode}, {err[-500:]}"


def check_final(out, ref, micro_yaml, reference):
    resume = (out / CHECKPOINT).exists()  # random kills may all have landed before the first checkpoint
    final = cli("pretrain", "--out", out, *(["--resume"] if resume else ["--config", micro_yaml]), *ARGS)
    assert final.returncode == 0, final.stderr
    check_folder(out, reference, "final")
    assert len(metrics_lines(out / "metrics.jsonl")) == STEPS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == STEPS
    assert summary["dev"] == json.loads((ref / "summary.json").read_text())["dev"]
    a, b = read_checkpoint(ref / CHECKPOINT), read_checkpoint(out / CHECKPOINT)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [p.name for p in (out / CHECKPOINT).parent.iterdir()] == ["last.pt"]  # temp files of killed writers cleared


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, micro_yaml):
    ref = tmp_path / "reference"
    started = time.perf_counter()
    done = cli("pretrain", "--config", micro_yaml, "--out", ref, *ARGS)
    lifetime = time.perf_counter() - started  # of a whole uninterrupted invocation, start-up included
    assert done.returncode == 0, done.stderr
    reference = metrics_lines(ref / "metrics.jsonl")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    # 1. each narrow window, in an order that reaches every one of them
    out = tmp_path / "named"
    expect = {  # kill point -> checkpoint step after the kill
        "startup": 0,  # fresh start, before any checkpoint
        "mid-step:5": 3,  # fresh again; killed between backward and optimizer step of step 5
        "before-rename:last.pt": 3,  # resumed; killed writing the checkpoint of step 6
        "before-rename:metrics.jsonl": 3,  # resumed; killed rewriting metrics.jsonl (lines 4-6 to drop)
        "after-final-checkpoint": STEPS,  # resumed; checkpoint of step 10 written, summary not yet
        "before-rename:summary.json": STEPS,  # resumed a finished run without summary; killed writing it
    }
    for kill, ckpt_step in expect.items():
        rc, note = run_once(out, micro_yaml, kill)
        assert rc == -signal.SIGKILL, note
        assert check_folder(out, reference, note) == ckpt_step, note
    assert not (out / "summary.json").exists()
    check_final(out, ref, micro_yaml, reference)

    # 2. kills at random moments of whole invocations (start-up, steps, checkpoints, evaluation, the end)
    out = tmp_path / "random"
    rng = random.Random()
    for attempt in range(8):
        rc, note = run_once(out, micro_yaml, rng.uniform(0.2, lifetime))
        assert rc in (-signal.SIGKILL, 0), note  # 0: it finished before the kill
        check_folder(out, reference, note)
        if rc == 0:
            break
    check_final(out, ref, micro_yaml, reference)
