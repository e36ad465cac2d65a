"""No runaway resources from one typo (issue 29): worker pools capped at the cores and the inputs, a
training step that cannot fit refused with one line before allocation, absurd sizes refused at load.

Every CLI process runs under a wall-clock timeout and an address-space limit, so a regression fails
the test instead of hanging or exhausting the (shared) machine."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from runhelpers import ENV, assert_one_line, cli

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
GIB = 1 << 30


def limited(gib: float, cores: int | None = None):
    """preexec_fn: cap the child's address space (a safety net: an unbounded allocation fails, not the
    machine); with ``cores``, pin it (and what it spawns) to that many CPUs."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (int(gib * GIB), int(gib * GIB)))
        if cores is not None:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    return apply


def bounded_cli(*args, gib: float = 6.0, timeout: float = 120, cores: int | None = None, **kw) -> subprocess.CompletedProcess:
    return cli(*args, preexec_fn=limited(gib, cores), timeout=timeout, **kw)


# --- absurd sizes: refused at load, one line, fast --------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("space.layers=100000", "space.layers=100,000, more than the limit"),
    ("model.hidden=10000000", "model.hidden=10,000,000, more than the limit"),
    ("data.vocab_size=1000000000", "data.vocab_size=1,000,000,000, more than the limit"),
    ("train.batch_size=1000000000", "train.batch_size=1,000,000,000, more than the limit"),
    ("train.eval_random_children=1000000000", "train.eval_random_children=1,000,000,000"),
    ("space.candidates=[ffn:99999999999]", "99999999999 is more than the limit"),
    ("space.candidates=[ffn:" + "9" * 5000 + "]", "expected ffn:<inner>"),
])
@pytest.mark.slow
def test_absurd_sizes_refused_in_one_line(override, needle):
    r = bounded_cli("space", "--config", TINY, "--set", override, "--set", "model.max_len=128")
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, needle)


@pytest.mark.slow
def test_space_of_a_huge_count_prints_fast():
    # 20^4096 children: more than the 4300 digits Python's str() prints; the count is still shown
    candidates = ",".join(f"ffn:{i}" for i in range(1, 21))
    r = bounded_cli("space", "--config", TINY, "--set", "space.layers=4096", "--set", f"space.candidates=[{candidates}]",
                    timeout=60)
    assert r.returncode == 0, r.stderr
    assert "e+5329 children" in r.stdout


@pytest.mark.slow
def test_sample_archs_huge_n_refused(tmp_path):
    r = bounded_cli("sample-archs", "--config", TINY, "--set", "space.layers=12", "--n", "100000000",
                    "--out", tmp_path / "a.txt", gib=3, timeout=60)
    assert r.returncode == 2, r.stderr
    assert_one_line(r.stderr, "--n 100,000,000 is more than the limit")


def test_search_settings_bound_evaluations():
    from nasfast.errors import UserError
    from nasfast.nas.search import SearchSettings

    with pytest.raises(UserError, match="more than the limit"):
        SearchSettings(population=10**9)


def test_finetune_settings_bound_batch_and_length():
    from nasfast.errors import UserError
    from nasfast.nas.finetune import FinetuneSettings

    for kw in ({"batch_size": 10**9}, {"max_len": 10**9}):
        with pytest.raises(UserError, match="more than the limit"):
            FinetuneSettings(**kw)


# --- worker pools: capped at the cores and the inputs ------------------------------------------------
def test_cap_workers_at_cores_says_so_once(capsys, monkeypatch):
    from nasfast import resources

    monkeypatch.setattr(resources, "usable_cores", lambda: 2)
    assert resources.cap_workers(100000, "--num-proc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nasfast: warning: --num-proc 100000 capped at 2 (the machine's cores)"]
    assert resources.cap_workers(2, "--num-proc", inputs=1, inputs_what="chunks") == 1
    assert resources.cap_workers(1, "--num-proc") == 1 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_prepare_data_huge_num_proc_capped(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of a small corpus with some words in it\n" for i in range(1500)))  # one chunk
    r = bounded_cli("prepare-data", "--config", TINY, "--num-proc", "6", "--out", tmp_path / "prep",
                    "--no-progress", "--set", f"data.corpus=[{corpus}]", "--set", "data.vocab_size=200",
                    "--set", "data.block_size=16", "--set", "model.max_len=16", "--set", "data.dev_blocks=8",
                    "--set", "data.anchor_blocks=0", gib=8, timeout=240, cores=2)
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if "capped" in l]
    assert len(warnings) == 2, r.stderr  # the cores, then the corpus's one chunk: no pool at all
    assert "--num-proc 6 capped at 2 (the machine's cores)" in warnings[0]  # 6, not more: a regression forks them all
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert "capped at 1 (the 1 chunk of 2000 text units" in warnings[1] and manifest["num_proc"] <= 2


# --- the memory of a training step ---------------------------------------------------------------------
MEASURE = r'''
import json, sys, torch
from nasfast.allocator import tune_malloc
tune_malloc()  # as the CLI runs
from nasfast.config import load_config
from nasfast.distributed import World
from nasfast.engines.plain import PlainEngine
from nasfast.space.checks import build_space
from nasfast.space.supernet import Supernet
from nasfast.training.memory import step_memory

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

cfg = load_config(None, sys.argv[1:]); space = build_space(cfg); V = cfg.data.vocab_size
B, T = cfg.train.batch_size, cfg.data.block_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(5, V, (B, T), generator=g)
labels = torch.where(torch.rand(B, T, generator=g) < cfg.data.mlm_probability, ids, torch.full_like(ids, -100))
batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels}
before = status("VmRSS")
model = Supernet(cfg.model, space, V); model.set_backend("eager")
engine = PlainEngine(model, cfg, World(), torch.device("cpu"))
archs = [(c,) * space.num_layers for c in range(len(space.candidates))]
for arch in archs + archs:  # every parameter trained once, then the steady state (full optimizer state)
    loss, _ = engine.forward_loss(arch, batch, 0, None)
    engine.backward(loss)
    engine.optimizer_step(arch)
print(json.dumps({"peak": status("VmHWM") - before,
                  "estimate": step_memory(cfg, space, V, fused_attention=False, aligns=False).total}))
'''


@pytest.mark.parametrize("overrides", [
    ["space.layers=2", "space.candidates=[mha:4,ffn:512,conv:3,identity]", "data.vocab_size=8192", "train.batch_size=32"],
    ["space.layers=4", "space.candidates=[mha:8]", "data.vocab_size=2000", "train.batch_size=16"],
    ["space.layers=3", "space.candidates=[ffn:1024,conv:5]", "data.vocab_size=8000", "train.batch_size=16",
     "model.hidden=256", "data.block_size=64", "model.max_len=64"],
])
@pytest.mark.slow
def test_step_estimate_within_1_5x_of_measured_peak(overrides):
    r = subprocess.run([sys.executable, "-c", MEASURE, *overrides], capture_output=True, text=True, env=ENV,
                       timeout=180, preexec_fn=limited(4))
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1 / 1.5 <= m["estimate"] / m["peak"] <= 1.5, m


# base.yaml is the GPU config (B=64 x T=512 x 24 layers of ffn:3072 is ~30 GB in CPU memory): it must
# fit an 80 GB GPU; the CPU configs must fit this 24 GiB machine with room to spare.
@pytest.mark.parametrize("name, limit_gib", [("tiny.yaml", 1.0), ("magic_test.yaml", 1.0), ("repro.yaml", 12.0),
                                             ("base.yaml", 78.0)])
def test_shipped_configs_fit(name, limit_gib):
    import torch

    from nasfast.space.checks import build_space, load_run_config
    from nasfast.space.samplers import SAMPLERS
    from nasfast.training.memory import fused_attention, step_memory

    cfg = load_run_config(REPO / "configs" / name)
    device = torch.device("cpu")  # this machine; on a GPU the check reads the GPU's free memory
    need = step_memory(cfg, build_space(cfg), cfg.data.vocab_size, fused_attention(cfg.kernels.backend, device),
                       SAMPLERS[cfg.sampler.name].aligns)
    assert need.total < limit_gib * GIB, (name, need)


@pytest.mark.slow
def test_pretrain_huge_batch_refused_before_allocation(tmp_path):
    # 100,000 sequences x 128 tokens: the estimate (hundreds of GiB) is refused before the model exists;
    # under a 3 GiB address-space limit an attempt would die (MemoryError / allocator traceback) instead.
    out = tmp_path / "run"
    r = bounded_cli("pretrain", "--config", TINY, "--out", out, "--no-progress", "--set", "train.batch_size=100000",
                    "--set", "train.steps=2", "--set", "train.warmup_steps=0", gib=3, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = assert_one_line(r.stderr, "a training step needs about")
    assert "GiB" in line and "memory available" in line and "lower train.batch_size" in line
    assert not (out / "config.yaml").exists()  # nothing was started that a rerun must clean up


def test_interference_child_count_is_bounded_before_any_weights_load(micro_space):
    """check_request runs before the CLI loads the supernet: an absurd --bases is one line, not hours."""
    from nasfast.analysis.interference import MAX_CHILDREN, check_request
    from nasfast.errors import UserError

    assert check_request(micro_space, 0, "ffn:40", None, bases=2, partners_per_distance=3)[1] == 2
    with pytest.raises(UserError, match=f"more than the limit {MAX_CHILDREN:,}"):
        check_request(micro_space, 0, "ffn:40", None, bases=10**9)
    with pytest.raises(UserError, match="must be >= 1"):
        check_request(micro_space, 0, "ffn:40", None, partners_per_distance=0)
