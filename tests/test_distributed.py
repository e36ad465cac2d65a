"""Two real processes (gloo, CPU): every rank trains the same children and ends with identical weights."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import MICRO_OVERRIDES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from nasfast.config import load_config
    from nasfast.training.trainer import Trainer

    cfg = load_config(None, MICRO_OVERRIDES + ["sampler.name=magic", "align.anchor_every=1", "align.anchor_init=random", "data.anchor_blocks=4"])
    trainer = Trainer(cfg, run_dir, progress=False)
    seen = []
    step = trainer.train_step

    def recording_step(s):
        record = step(s)
        seen.append((record["child"], record["anchor"], record["anchor_changed"]))
        return record

    trainer.train_step = recording_step
    summary = trainer.train()
    torch.save({"seen": seen, "model": trainer.model.state_dict(), "summary": summary}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree(tmp_path):
    run_dir = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(run_dir), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["seen"] == r1["seen"] and len(r0["seen"]) == 6
    assert len({c for c, _, _ in r0["seen"]}) > 1
    for name, tensor in r0["model"].items():
        assert torch.equal(tensor, r1["model"][name]), name
    # rank 0 alone wrote the run folder
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "summary.json").is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


@pytest.mark.slow
def test_torchrun_from_the_repo_root(tmp_path, micro_yaml):
    """What README tells users to type, from the checkout (whose folders must shadow no package)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "nasfast", "pretrain",
           "--config", str(micro_yaml), "--out", str(tmp_path / "run"), "--no-progress", "--set", "train.steps=3"]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and "x2" in summary["engine"], summary["engine"]
