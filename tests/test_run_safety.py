"""A run folder is never lost or silently corrupted (W1-W7): lock, divergence guard, resume guards."""
import json
import signal
import time

import pytest
import torch
from conftest import MICRO_OVERRIDES
from runhelpers import assert_one_line, cli, copy_run, popen, strict_json_lines

from nasfast.cli.app import main
from nasfast.config import load_config, save_config
from nasfast.data.blocks import load_tokenizer
from nasfast.training.checkpointer import CHECKPOINT, read_checkpoint
from nasfast.training.metrics import read_metrics
from nasfast.training.optim import lr_lambda
from nasfast.training.trainer import Trainer


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A micro run of 6 steps stopped (and checkpointed) at step 2, and its config file."""
    root = tmp_path_factory.mktemp("safety")
    cfg = load_config(None, MICRO_OVERRIDES)
    save_config(cfg, root / "micro.yaml")
    Trainer(cfg, root / "run", stop_after=2, progress=False).train()
    return root


def pretrain(capsys, *argv):
    """In-process ``nasfast pretrain``; returns (exit code, stdout, stderr)."""
    code = main(["pretrain", "--no-progress", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- W1: one writer per run folder ---------------------------------------------------------------
@pytest.mark.slow
def test_second_writer_fails_naming_the_holder_and_lock_dies_with_it(tmp_path, micro_yaml):
    out = tmp_path / "run"
    first = popen("pretrain", "--config", micro_yaml, "--out", out, "--no-progress", "--set", "train.steps=100000",
                  "--set", "train.ckpt_every=1", "--set", "train.eval_every=100000")
    deadline = time.time() + 120
    while not (out / CHECKPOINT).exists():
        assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() is not None else "timeout"
        time.sleep(0.05)
    config_before = (out / "config.yaml").read_bytes()
    second = cli("pretrain", "--config", micro_yaml, "--out", out, "--no-progress", "--set", "train.seed=7",
                 "--set", "train.steps=3")
    assert second.returncode == 2
    assert_one_line(second.stderr, f"pid {first.pid}")
    resumer = cli("pretrain", "--out", out, "--resume", "--no-progress", "--stop-after", "1")
    assert resumer.returncode == 2 and "in use" in resumer.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / "config.yaml").read_bytes() == config_before  # the second writer wrote nothing
    assert load_config(out / "config.yaml").train.seed == 0
    # SIGKILL released the lock: no stale lock blocks the run forever
    again = cli("pretrain", "--out", out, "--resume", "--no-progress", "--stop-after", "1")
    assert again.returncode == 0, again.stderr


# --- W2: divergence keeps the last good checkpoint -----------------------------------------------
def test_divergence_stops_and_keeps_the_last_finite_checkpoint(tmp_path, micro_yaml, capsys):
    out = tmp_path / "run"
    code, _, err = pretrain(capsys, "--config", micro_yaml, "--out", out, "--set", "train.lr=1e6", "--set", "train.clip_norm=0",
                            "--set", "train.ckpt_every=2", "--set", "train.steps=12", "--set", "train.eval_every=100")
    assert code == 1
    line = assert_one_line(err, "non-finite loss at step 4")
    assert "last good checkpoint is step 2" in line
    state = read_checkpoint(out / CHECKPOINT)  # loads, and is checked finite tensor by tensor
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    records = strict_json_lines(out / "metrics.jsonl")  # strict JSON: NaN is written as null
    assert records[-1]["step"] == 4 and records[-1]["loss"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 4" in summary["message"]
    # the kept checkpoint is usable: resume it with a sane LR (allowed on resume) and finish finite
    code, _, err = pretrain(capsys, "--out", out, "--resume", "--set", "train.lr=1e-3")
    assert code == 0, err
    records = strict_json_lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(r["loss"] is not None for r in records[2:])


def test_nonfinite_state_is_never_checkpointed(micro_config, tmp_path):
    """Finite losses and gradient norms, but an optimizer moment that overflowed to inf: the
    checkpointer itself refuses the state and the last good checkpoint stays."""
    Trainer(micro_config, tmp_path / "run", progress=False, stop_after=2).train()
    good = (tmp_path / "run" / CHECKPOINT).read_bytes()
    trainer = Trainer(micro_config, tmp_path / "run", resume=True, progress=False)
    embedding = trainer.model.embeddings.tokens.weight  # trained by every child
    trainer.engine.optimizer.state[embedding]["exp_avg_sq"][0, 0] = float("inf")
    summary = trainer.train()
    assert summary["status"] == "diverged"
    assert "non-finite state after step 4" in summary["message"] and "last good checkpoint is step 2" in summary["message"]
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == good
    assert all(r["loss"] is not None for r in strict_json_lines(tmp_path / "run" / "metrics.jsonl"))


# --- W3: a refused resume writes nothing ---------------------------------------------------------
def test_refused_resume_leaves_the_run_intact(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run / "run", tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run / "config.yaml", run / CHECKPOINT, run / "metrics.jsonl")}
    for override, key in (("space.layers=4", "space.layers"), ("space.candidates=[mha:2, ffn:40]", "space.candidates")):
        code, _, err = pretrain(capsys, "--out", run, "--resume", "--set", override)
        assert code == 2
        assert_one_line(err, key)
        assert {p.name: p.read_bytes() for p in (run / "config.yaml", run / CHECKPOINT, run / "metrics.jsonl")} == before
    (tmp_path / "archs.txt").write_text("mha:2|ffn:40|identity\n")
    assert main(["evaluate", "--run", str(run), "--archs", str(tmp_path / "archs.txt"), "--no-progress"]) == 0
    code, _, err = pretrain(capsys, "--out", run, "--resume")
    assert code == 0, err


# --- W4: resuming a finished run keeps (or restores) its summary ---------------------------------
def test_resume_of_a_finished_run_keeps_its_summary(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run / "run", tmp_path / "run")
    assert pretrain(capsys, "--out", run, "--resume")[0] == 0
    finished = (run / "summary.json").read_bytes()
    code, out, _ = pretrain(capsys, "--out", run, "--resume")
    assert code == 0 and "already completed" in out
    assert (run / "summary.json").read_bytes() == finished
    # a SIGKILL after the final checkpoint loses summary.json: the next resume rebuilds it
    (run / "summary.json").unlink()
    assert pretrain(capsys, "--out", run, "--resume")[0] == 0
    old, new = json.loads(finished), json.loads((run / "summary.json").read_text())
    assert new["status"] == "completed" and new["step"] == 6 and new["tokens_per_s"] > 0
    assert new["dev"] == old["dev"]


# --- W5: the metrics rewrite on resume is atomic, and tolerates a torn line ----------------------
@pytest.mark.slow
def test_kill_during_metrics_rewrite_loses_no_history(stopped_run, tmp_path):
    run = copy_run(stopped_run / "run", tmp_path / "run")
    kept = (run / "metrics.jsonl").read_bytes()
    later = "".join(json.dumps({"step": 3 + i % 3, "loss": 1.0, "pad": "x" * 200}) + "\n" for i in range(20000))
    (run / "metrics.jsonl").write_bytes(kept + later.encode() + b'{"step": 4, "lo')  # big, with a torn last line
    killed = cli("pretrain", "--out", run, "--resume", "--no-progress", env={"NASFAST_KILL_AT": "before-rename:metrics.jsonl"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "metrics.jsonl").read_bytes().startswith(kept)  # history intact after the kill
    done = cli("pretrain", "--out", run, "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in strict_json_lines(run / "metrics.jsonl")] == list(range(1, 7))


def test_resume_drops_a_torn_last_metrics_line(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run / "run", tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 3, "loss": 5.9')
    code, _, err = pretrain(capsys, "--out", run, "--resume", "--stop-after", "1")
    assert code == 0, err
    assert [r["step"] for r in strict_json_lines(run / "metrics.jsonl")] == [1, 2, 3]


# --- W6: a fresh start never reuses a stale data/ ------------------------------------------------
def test_fresh_start_replaces_data_left_by_a_killed_start(micro_config, micro_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(micro_config, out, progress=False).folder.release()  # a start killed before its first checkpoint
    assert (out / "data" / "blocks.npz").is_file() and not (out / CHECKPOINT).exists()
    old_vocab = len(load_tokenizer(out / "data" / "tokenizer"))
    code, _, err = pretrain(capsys, "--config", micro_yaml, "--out", out, "--set", "data.vocab_size=250", "--set", "train.steps=2")
    assert code == 0, err
    assert len(load_tokenizer(out / "data" / "tokenizer")) <= 250 < old_vocab
    assert load_config(out / "config.yaml").data.vocab_size == 250


# --- W7: what a resume may change, and that what is saved is what is used -------------------------
def test_resume_rejects_changes_that_would_make_another_run(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run / "run", tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    for override in ("train.batch_size=8", "data.vocab_size=500", "train.seed=3", "sampler.name=magic-t"):
        code, _, err = pretrain(capsys, "--out", run, "--resume", "--set", override)
        assert code == 2
        assert_one_line(err, override.split("=")[0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [steps: 3\n")
    code, _, err = pretrain(capsys, "--out", run, "--resume", "--config", bad)
    assert code == 2 and "not valid YAML" in err
    other = load_config(stopped_run / "micro.yaml", ["model.hidden=36"])
    save_config(other, tmp_path / "other.yaml")
    code, _, err = pretrain(capsys, "--out", run, "--resume", "--config", tmp_path / "other.yaml")
    assert code == 2
    assert_one_line(err, "model.hidden")
    assert (run / "config.yaml").read_bytes() == before


def test_resume_applies_what_it_saves(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run / "run", tmp_path / "run")
    code, _, err = pretrain(capsys, "--out", run, "--resume", "--config", stopped_run / "micro.yaml",
                            "--set", "train.lr=3e-4", "--set", "train.steps=8", "--set", "train.log_every=2")
    assert code == 0, err
    saved = load_config(run / "config.yaml")
    assert saved.train.lr == 3e-4 and saved.train.steps == 8 and saved.train.log_every == 2
    assert read_checkpoint(run / CHECKPOINT)["config"] == saved.to_dict()
    f = lr_lambda(saved.train.warmup_steps, 8, saved.train.min_lr_ratio)
    resumed = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if r["step"] > 2}
    assert resumed[3]["lr"] == pytest.approx(3e-4 * f(2))  # the new peak LR and schedule, from the first resumed step
    assert resumed[8]["lr"] == pytest.approx(3e-4 * f(7))


def test_impossible_step_counts_are_refused(stopped_run, tmp_path, micro_yaml, capsys):
    run = copy_run(stopped_run / "run", tmp_path / "run")
    for flag in ("0", "-2"):
        code, _, err = pretrain(capsys, "--config", micro_yaml, "--out", tmp_path / "new", "--stop-after", flag)
        assert code == 2
        assert_one_line(err, "--stop-after")
    assert pretrain(capsys, "--out", run, "--resume", "--stop-after", "2")[0] == 0  # now at step 4
    code, _, err = pretrain(capsys, "--out", run, "--resume", "--set", "train.steps=3")
    assert code == 2
    assert_one_line(err, "train.steps=3 is below the checkpoint's step 4")
    assert not (tmp_path / "new").exists()
