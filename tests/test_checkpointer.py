"""Checkpointer guarantees, metrics.jsonl rewriting and strict JSON, the LR retarget on resume, bug reports."""
import json
import math

import pytest
import torch

from nasfast.cli import app as cli
from nasfast.config import load_config
from nasfast.errors import UserError
from nasfast.training.checkpointer import Checkpointer, NonFiniteState, RngState, read_checkpoint
from nasfast.training.metrics import MetricsLog, dumps, read_metrics
from nasfast.training.optim import build_optimizer, build_scheduler, retarget_schedule


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_save_load_round_trip_and_nonfinite_refusal(tmp_path):
    model, opt = model_and_optimizer()
    model(torch.randn(3, 7)).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path / "c" / "last.pt", {"model": model, "optimizer": opt, "rng": RngState()})
    ckpt.save(5, {"note": "kept"})
    good = (tmp_path / "c" / "last.pt").read_bytes()
    with torch.no_grad():
        model[0].weight[2, 3] = float("nan")
    with pytest.raises(NonFiniteState, match=r"1 of \d+ tensors hold NaN or inf \(first: model.0.weight\); the last good checkpoint is step 5"):
        ckpt.save(6)
    assert (tmp_path / "c" / "last.pt").read_bytes() == good and ckpt.last_step == 5
    fresh, fresh_opt = model_and_optimizer(seed=1)
    other = Checkpointer(tmp_path / "c" / "last.pt", {"model": fresh, "optimizer": fresh_opt, "rng": RngState()})
    state = other.read()
    assert other.load(state) == 5 and state["note"] == "kept"
    assert torch.equal(fresh[0].bias, model[0].bias)


def test_load_names_what_does_not_fit(tmp_path):
    model, opt = model_and_optimizer()
    Checkpointer(tmp_path / "last.pt", {"model": model, "optimizer": opt}).save(1)
    wider = torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.LayerNorm(6))
    ckpt = Checkpointer(tmp_path / "last.pt", {"model": wider, "optimizer": torch.optim.AdamW(wider.parameters())})
    with pytest.raises(UserError, match=r"of another shape \(e.g. 0.weight: \(5, 7\) saved, \(6, 7\) built\)"):
        ckpt.load(ckpt.read())
    with pytest.raises(UserError, match="no sampler"):
        Checkpointer(tmp_path / "last.pt", {"model": model, "sampler": RngState()}).read()
    torch.save({"step": 1, "model": {"w": torch.tensor([1.0, math.inf])}}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="1 of 1 tensors hold NaN or inf"):
        read_checkpoint(tmp_path / "old.pt")


def test_metrics_resume_keeps_history_and_damaged_middle_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2)] + ["not json, kept for a human"]
    lines += [json.dumps({"step": s, "loss": 0.1}) for s in (3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')
    log = MetricsLog(path, resume_step=3)
    log.write({"step": 4, "loss": float("nan"), "dev": {"x": {"loss": float("inf")}}})
    log.close()
    text = path.read_text().splitlines()
    assert text[:4] == lines[:4] and len(text) == 5
    assert json.loads(text[4]) == {"step": 4, "loss": None, "dev": {"x": {"loss": None}}}
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    untouched = path.stat().st_mtime_ns
    MetricsLog(path, resume_step=4).close()  # nothing to drop: no rewrite at all
    assert path.stat().st_mtime_ns == untouched


def test_strict_json():
    assert dumps({"a": [1.0, float("nan"), -float("inf")], "b": torch.tensor(2.5)}) == '{"a": [1.0, null, null], "b": 2.5}'


def test_retarget_schedule_applies_new_peak_and_length():
    cfg = load_config(None, ["train.lr=1e-3", "train.steps=10", "train.warmup_steps=2", "train.min_lr_ratio=0.1"])
    model, _ = model_and_optimizer()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(4):
        opt.step()
        sched.step()
    cfg.train.lr, cfg.train.steps = 5e-4, 20
    new_sched = build_scheduler(opt, cfg)
    new_sched.load_state_dict(sched.state_dict())
    retarget_schedule(opt, new_sched, cfg.train.lr)
    expected = 5e-4 * (1.0 - 0.9 * (4 - 2) / (20 - 2))
    assert all(g["lr"] == pytest.approx(expected) for g in opt.param_groups)
    assert new_sched.get_last_lr()[0] == pytest.approx(expected)


def test_internal_errors_say_they_are_bugs(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setitem(cli.COMMANDS, "space", broken)
    assert cli.main(["space", "--config", "x.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" in err[0] and "this is a bug in nasfast" in err[-1] and "ZeroDivisionError" in err[-1]
