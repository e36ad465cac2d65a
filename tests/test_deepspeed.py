"""DeepSpeed ZeRO-1/2/3 with real processes (2 ranks, gloo, CPU): same semantics as the plain trainer.

Every run here is a real 2-process job: ``mp.spawn`` workers running the Trainer (one process group,
several runs in sequence to keep CI time down) and, once, the ``deepspeed`` launcher itself.
Tolerance: DeepSpeed reduces gradients in flat buckets and the plain engine in one coalesced
all-reduce, and each sums the same fp32 values in another order; over a few steps the weights then
differ by a few ulps (≲ 1e-6 relative), far below a single update (lr · 1 ≈ 1e-3). We allow 1e-5
absolute on weights and 1e-6 relative on losses; parameters of candidates no child used must be
bitwise equal to their initial values, with no optimizer state.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO_OVERRIDES

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = ROOT / "configs" / "ds"
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(sampler: str) -> list[str]:
    extra = ["align.anchor_every=1", "align.anchor_init=random", "align.anchor_warmup=1", "data.anchor_blocks=4"]
    return MICRO_OVERRIDES + [f"sampler.name={sampler}", f"train.steps={STEPS}", "train.ckpt_every=100",
                              "train.eval_every=100", "train.grad_accum=2"] + (extra if sampler == "magic" else [])


def _worker(rank: int, world: int, port: int, jobs: list[dict], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from nasfast.config import load_config
    from nasfast.training.trainer import Trainer

    results = {}
    for job in jobs:
        os.environ.pop("NASFAST_ZERO_CHILD_STEP", None)
        os.environ.update(job.get("env", {}))  # read when the engine is built
        cfg = load_config(None, job["overrides"])
        trainer = Trainer(cfg, Path(out_dir) / job["name"], progress=False)
        initial = _full_parameters(trainer)
        seen = []
        step = trainer.train_step

        def recording_step(s, step=step, seen=seen):
            record = step(s)
            seen.append((record["child"], record["loss"], record.get("anchor")))
            return record

        trainer.train_step = recording_step
        trainer.train()
        results[job["name"]] = {"seen": seen, "initial": initial, "final": _full_parameters(trainer),
                                "state_keys": _optimizer_state_keys(trainer)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _full_parameters(trainer) -> dict:
    engine = trainer.engine
    if hasattr(engine, "full_parameters"):
        return engine.full_parameters()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _optimizer_state_keys(trainer) -> list[str]:
    """Groups (DeepSpeed) or parameter names (plain) that hold Adam state."""
    engine = trainer.engine
    if hasattr(engine, "full_parameters"):
        adam, zero = engine.optimizer, engine.engine.optimizer  # the torch optimizer; DeepSpeed's ZeRO wrapper
        flat = getattr(zero, "fp32_partitioned_groups_flat", None)
        if flat is not None:  # ZeRO-3: at rest the groups hold no tensors; Adam state is keyed by flat fp32 sub-groups
            return sorted({adam.param_groups[zero.sub_group_to_group_id[i]]["key"]
                           for i, t in enumerate(flat) if adam.state.get(t)})
        return sorted({g["key"] for g in adam.param_groups for p in g["params"] if adam.state.get(p)})
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return sorted(names[id(p)] for p in engine.optimizer.state)


def _spawn(tmp_path: Path, jobs: list[dict]) -> dict:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), jobs, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _used(children: list[str], space) -> set[str]:
    """Parameter-name prefixes of every candidate some child trained."""
    return {f"layers.{layer}.{space.candidates.index(next(c for c in space.candidates if c.name == op))}."
            for child in children for layer, op in enumerate(child.split("|"))}


@pytest.mark.parametrize("sampler", ["spos", "magic"])
def test_zero_stages_equal_plain_data_parallel(tmp_path, sampler):
    from nasfast.config import load_config
    from nasfast.space.checks import build_space

    jobs = [{"name": "plain", "overrides": _overrides(sampler)}]
    jobs += [{"name": f"zero{s}", "overrides": _overrides(sampler) + [f"train.deepspeed={DS_CONFIGS / f'zero{s}.json'}"]}
             for s in (1, 2, 3)]
    fallback = [f"zero{s}-deepspeed-step" for s in (2, 3)] if sampler == "spos" else []
    # DeepSpeed's own step, as on a DeepSpeed release the child-only step is not tested with: same semantics
    jobs += [{"name": name, "env": {"NASFAST_ZERO_CHILD_STEP": "0"},
              "overrides": _overrides(sampler) + [f"train.deepspeed={DS_CONFIGS / (name.split('-')[0] + '.json')}"]}
             for name in fallback]
    r0, r1 = _spawn(tmp_path, jobs)
    space = build_space(load_config(None, _overrides(sampler)))
    plain = r0["plain"]
    children = [c for c, _, _ in plain["seen"]]
    used = _used(children, space)
    untouched = [n for n in plain["initial"] if n.startswith("layers.") and not any(n.startswith(u) for u in used)]
    assert untouched, "the test needs candidates that no child used"
    for stage in ("zero1", "zero2", "zero3", *fallback):
        a, b = r0[stage], r1[stage]
        # each rank records its own micro-batch loss; children and anchors must agree
        assert [(c, x) for c, _, x in a["seen"]] == [(c, x) for c, _, x in b["seen"]], f"{stage}: ranks disagree"
        assert [c for c, _, _ in a["seen"]] == children and [x[2] for x in a["seen"]] == [x[2] for x in plain["seen"]]
        for (_, la, _), (_, lp, _) in zip(a["seen"], plain["seen"]):
            assert la == pytest.approx(lp, rel=1e-6), stage
        for name, value in plain["final"].items():
            assert torch.allclose(a["final"][name], value, rtol=0, atol=1e-5), (stage, name)
            assert torch.equal(a["final"][name], b["final"][name]), (stage, name)  # ranks hold the same weights
        for name in untouched:  # candidates outside every child: bit for bit, and no Adam state
            assert torch.equal(a["final"][name], a["initial"][name]), (stage, name)
        state_groups = set(a["state_keys"])
        assert "shared" in state_groups and len(state_groups) > 1, (stage, state_groups)  # the check below is not vacuous
        assert not any(k != "shared" and f"layers.{k.split('.')[0]}.{k.split('.')[1]}." not in used for k in state_groups), stage


def _gather_worker(rank: int, world: int, port: int, stages: list[int], out_dir: str) -> None:
    """Trains a few spos steps per ZeRO stage and records, per step, all-gathered bytes and the child's bytes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    gathered = [0]
    original = dist.all_gather_into_tensor

    def counted(*args, **kwargs):  # wrapped before DeepSpeed binds it; output_tensor by keyword or first
        output = kwargs.get("output_tensor", args[0] if args else None)
        gathered[0] += output.numel() * output.element_size()
        return original(*args, **kwargs)

    dist.all_gather_into_tensor = counted
    from nasfast.config import load_config
    from nasfast.training.trainer import Trainer

    results = {}
    for stage in stages:
        cfg = load_config(None, _overrides("spos") + [f"train.deepspeed={DS_CONFIGS / f'zero{stage}.json'}"])
        trainer = Trainer(cfg, Path(out_dir) / f"zero{stage}", progress=False)
        model, steps = trainer.model, []
        supernet = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()) * 4
        step, optimizer_step = trainer.train_step, trainer.engine.optimizer_step

        def recording_optimizer_step(arch, optimizer_step=optimizer_step, model=model, steps=steps):
            steps[-1]["child"] = sum(getattr(p, "ds_numel", p.numel()) * 4 for p in model.child_parameters(arch))
            return optimizer_step(arch)

        def recording_step(s, step=step, steps=steps):
            before = gathered[0]
            steps.append({})
            record = step(s)
            steps[-1]["gathered"] = gathered[0] - before
            return record

        trainer.train_step, trainer.engine.optimizer_step = recording_step, recording_optimizer_step
        trainer.train()
        results[stage] = {"steps": steps, "supernet": supernet}
    torch.save(results, Path(out_dir) / f"gathers{rank}.pt")


def test_zero_gathers_only_the_child_once_per_step(tmp_path):
    """ZeRO-1/2 all-gather only the child's updated groups after a step, not the supernet; ZeRO-3 gathers the
    child once per step (2 micro-batches: forward and backward of both reuse the first forward's gather)."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, _free_port(), [1, 2, 3], str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "gathers0.pt", weights_only=False)
    for stage, result in results.items():
        assert len(result["steps"]) == STEPS
        for step in result["steps"]:
            assert result["supernet"] > 1.5 * step["child"], "the test needs children much smaller than the supernet"
            # padding of flat groups / partitions to the world size adds a few elements per tensor
            assert step["child"] <= step["gathered"] <= 1.1 * step["child"], (stage, step, result["supernet"])


class _NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); every gradient behind it becomes NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_worker(rank: int, world: int, port: int, stages: list[int], out_dir: str) -> None:
    """Step 2's gradients are NaN on rank 1 only: record the norm each rank sees and the state around that step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from nasfast.config import load_config
    from nasfast.training.trainer import Trainer

    results = {}
    for stage in stages:
        cfg = load_config(None, _overrides("spos") + [f"train.deepspeed={DS_CONFIGS / f'zero{stage}.json'}"])
        trainer = Trainer(cfg, Path(out_dir) / f"zero{stage}", progress=False)
        engine, seen = trainer.engine, {}
        forward_loss, optimizer_step = engine.forward_loss, engine.optimizer_step

        def state():
            # keyed by the flat fp32 partitions DeepSpeed hands the optimizer (the same tensors all run long)
            adam = {id(p): {k: v.clone() for k, v in s.items()} for p, s in engine.optimizer.state.items()}
            return engine.full_parameters(), adam

        def poisoned_forward(arch, batch, seed, anchor, forward_loss=forward_loss, trainer=trainer):
            loss, extras = forward_loss(arch, batch, seed, anchor)
            return (_NanGradient.apply(loss) if trainer.step == 2 and rank == 1 else loss), extras

        def recording_step(arch, optimizer_step=optimizer_step, trainer=trainer, seen=seen):
            if trainer.step == 2:
                seen["before"] = state()
            norm = optimizer_step(arch)
            if trainer.step == 2:
                seen["after"], seen["norm"] = state(), norm
            return norm

        engine.forward_loss, engine.optimizer_step = poisoned_forward, recording_step
        summary = trainer.train()
        results[stage] = {**seen, "status": summary["status"]}
    torch.save(results, Path(out_dir) / f"nan{rank}.pt")


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The child-only ZeRO-1/2 step and ZeRO-3's step: a NaN gradient on one rank leaves weights and Adam
    state unchanged bit for bit on both ranks, the step reports a NaN norm and the run stops as diverged."""
    import math

    import torch.multiprocessing as mp

    mp.spawn(_nan_worker, args=(2, _free_port(), [1, 2, 3], str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for stage, result in torch.load(tmp_path / f"nan{rank}.pt", weights_only=False).items():
            assert math.isnan(result["norm"]) and result["status"] == "diverged", (rank, stage)
            (weights, adam), (weights_after, adam_after) = result["before"], result["after"]
            assert adam and adam.keys() == adam_after.keys(), (rank, stage)
            assert all(torch.equal(weights[n], weights_after[n]) for n in weights), (rank, stage)
            assert all(torch.equal(adam[k][s], adam_after[k][s]) for k in adam for s in adam[k]), (rank, stage)


def _ds_launch(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           "--module", "nasfast", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_deepspeed_launcher_resume_is_exact(tmp_path, micro_yaml):
    """Through the `deepspeed` launcher, ZeRO-3: N steps + resume + N steps equals 2N uninterrupted.

    ZeRO-3 keeps the weights only in the partitioned shards, so equality is checked on what the
    weights produce: every logged training loss and the final dev losses of the evaluated children,
    bit for bit. (ZeRO-1/2/3 resume through the same code path; the 2N run is one launch.)
    """
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = ["--config", str(micro_yaml), "--deepspeed", str(DS_CONFIGS / "zero3.json"), "--no-progress",
              "--set", "train.steps=6", "--set", "train.ckpt_every=2", "--set", "train.eval_every=6"]
    full, split = tmp_path / "full", tmp_path / "split"
    repo = Path(__file__).resolve().parents[1]  # users launch from the checkout: its folders must not shadow packages
    for args, cwd in ((["pretrain", "--out", str(full), *common], repo),
                      (["pretrain", "--out", str(split), *common, "--stop-after", "3"], tmp_path),
                      (["pretrain", "--out", str(split), "--resume", "--no-progress"], tmp_path)):
        res = _ds_launch(args, cwd, env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == 6 and [(r["step"], r["loss"], r["child"]) for r in a] == [(r["step"], r["loss"], r["child"]) for r in b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, split))
    assert sa["dev"] == sb["dev"] and sa["engine"] == sb["engine"] == "deepspeed zero-3 x2"
    assert [p.name for p in (split / "checkpoints" / "deepspeed").iterdir()] == ["step6"]  # older shards pruned


@pytest.mark.parametrize("content,message", [
    (None, "DeepSpeed config not found"),
    ("{not json", "is not valid JSON"),
    ('{"zero_optimization": {"stage": 7}}', "zero_optimization.stage must be an integer 0-3, got 7"),
    ('{"train_micro_batch_size_per_gpu": 5}', "does not match train.batch_size=4"),
    ('{"optimizer": {"type": "Adam"}}', "remove 'optimizer'"),
    ('{"gradient_clipping": 0.5}', "gradient_clipping=0.5 but train.clip_norm=1.0"),
])
def test_bad_deepspeed_config_exits_2_with_one_line(tmp_path, micro_yaml, content, message, capsys, monkeypatch):
    from nasfast.cli.app import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    rc = main(["pretrain", "--config", str(micro_yaml), "--out", str(tmp_path / "run"), "--deepspeed", str(path)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # refused before the run folder, process group or tokenizer


def test_deepspeed_flag_without_deepspeed_installed(tmp_path, micro_yaml, monkeypatch, capsys):
    from nasfast.cli.app import main

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without the package looks like
    rc = main(["pretrain", "--config", str(micro_yaml), "--out", str(tmp_path / "run"), "--deepspeed",
               str(DS_CONFIGS / "zero2.json")])
    assert rc == 2 and "needs the deepspeed package" in capsys.readouterr().err


def test_single_process_deepspeed_run(tmp_path, micro_yaml):
    """`nasfast pretrain --deepspeed` without a launcher: a one-rank process group, no MPI needed."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "nasfast", "pretrain", "--config", str(micro_yaml), "--out", str(tmp_path / "run"),
                          "--deepspeed", str(DS_CONFIGS / "zero2.json"), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "deepspeed zero-2 x1"


def test_the_child_only_zero_step_runs_only_on_tested_deepspeed_releases(monkeypatch):
    from nasfast.engines.zero_child import TESTED_DEEPSPEED, fallback_cost, internals_tested

    monkeypatch.delenv("NASFAST_ZERO_CHILD_STEP", raising=False)
    assert internals_tested(TESTED_DEEPSPEED[0]) and not internals_tested("0.14.0") and not internals_tested("0.20.0")
    line = fallback_cost("0.20.0")
    assert "\n" not in line and line.startswith("DeepSpeed 0.20.0 is not a release") and "all-gathered" in line
    monkeypatch.setenv("NASFAST_ZERO_CHILD_STEP", "0")
    assert not internals_tested(TESTED_DEEPSPEED[0])
    assert fallback_cost(TESTED_DEEPSPEED[0]).startswith("NASFAST_ZERO_CHILD_STEP=0; using DeepSpeed's own step")
