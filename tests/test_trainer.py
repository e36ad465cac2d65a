import json

import pytest
import torch

from nasfast.training.checkpointer import CHECKPOINT
from nasfast.training.checkpointer import raw_checkpoint as load
from nasfast.training.metrics import read_metrics
from nasfast.training.trainer import Trainer


def run(cfg, out, **kw):
    return Trainer(cfg, out, progress=False, **kw).train()


def test_run_writes_metrics_summary_and_checkpoint(micro_config, tmp_path):
    summary = run(micro_config, tmp_path / "r")
    assert summary["status"] == "completed" and summary["step"] == 6
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"loss", "lr", "tokens_per_s", "child", "grad_norm"} <= r.keys()
    assert "dev" in records[2] and "dev" in records[5] and "dev" not in records[0]
    assert set(records[5]["dev"]) == {"largest_with_context", "smallest_with_context", "smallest", "random0"}
    assert len({r["child"] for r in records}) > 1  # SPOS samples different children
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["dev"]["largest_with_context"]["loss"] > 0 and saved["unigram_entropy"] > 0
    assert load(tmp_path / "r" / CHECKPOINT)["step"] == 6
    assert (tmp_path / "r" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "r" / "data" / "tokenizer").is_dir() and (tmp_path / "r" / "config.yaml").is_file()


def test_resume_is_bitwise_identical(micro_config, tmp_path):
    micro_config.train.grad_accum = 2
    run(micro_config, tmp_path / "straight")
    first = run(micro_config, tmp_path / "split", stop_after=3)
    assert first["status"] == "stopped" and first["step"] == 3
    run(micro_config, tmp_path / "split", resume=True)
    a = load(tmp_path / "straight" / CHECKPOINT)
    b = load(tmp_path / "split" / CHECKPOINT)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    la = [(r["step"], r["loss"], r["child"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    lb = [(r["step"], r["loss"], r["child"]) for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert la == lb



def test_building_and_training_leave_the_callers_rng_untouched(micro_config, tmp_path):
    """Init, masking and dropout draw from their own seeded streams, not from the caller's global RNG."""
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    trainer = Trainer(micro_config, tmp_path / "r", progress=False)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(12)
    expected = torch.rand(4)
    torch.manual_seed(12)
    trainer.train()
    assert torch.equal(torch.rand(4), expected)

def test_refuses_to_overwrite_a_run(micro_config, tmp_path):
    import pytest

    from nasfast.errors import UserError

    run(micro_config, tmp_path / "r", stop_after=2)
    with pytest.raises(UserError, match="--resume"):
        Trainer(micro_config, tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(micro_config, tmp_path / "other", resume=True, progress=False)


@pytest.mark.slow
def test_loss_decreases(micro_config, tmp_path):
    micro_config.train.steps = 80
    micro_config.train.batch_size = 16
    micro_config.train.eval_every = 80
    micro_config.train.lr = 5e-3
    micro_config.train.warmup_steps = 5
    micro_config.space.candidates = ["ffn:40", "mha:2"]
    summary = run(micro_config, tmp_path / "r")
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    print(first, last, summary["dev"]["largest_with_context"]["loss"], summary["unigram_entropy"])
    assert last < first - 0.5
    assert summary["dev"]["largest_with_context"]["loss"] < summary["unigram_entropy"]


def test_lr_schedule_warmup_then_linear_decay():
    from nasfast.training.optim import lr_lambda

    f = lr_lambda(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_bf16_autocast_step(micro_config, tmp_path):
    micro_config.train.bf16 = True
    micro_config.train.steps = 2
    summary = run(micro_config, tmp_path / "r")
    records = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert summary["status"] == "completed" and all(r["loss"] == r["loss"] for r in records)
