"""Every bad input of the run-folder issue ends in one line on stderr and exit 2, never a traceback."""
import gzip
import json
import os
import random
import signal
import subprocess
import time

import pytest
from conftest import MICRO_OVERRIDES
from runhelpers import assert_one_line, cli, copy_run, popen, unprivileged

from nasfast.cli.app import main
from nasfast.config import load_config, save_config
from nasfast.data.blocks import MAX_UNDECODABLE_SHARE, corpus_files, read_lines
from nasfast.errors import UserError
from nasfast.training.checkpointer import CHECKPOINT
from nasfast.training.trainer import Trainer

ARCH = "mha:2|ffn:40|identity"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished micro run (6 steps), its config, an arch list and estimates."""
    root = tmp_path_factory.mktemp("errors")
    cfg = load_config(None, MICRO_OVERRIDES)
    save_config(cfg, root / "micro.yaml")
    Trainer(cfg, root / "run", progress=False).train()
    (root / "archs.txt").write_text(f"{ARCH}\nconv:3|mha:3|conv:5\nidentity|identity|ffn:40\n")
    return root


def expect(capsys, argv, needle):
    """In-process CLI: exit 2, exactly one stderr line holding ``needle``, no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return assert_one_line(err, needle)


def garbage(n: int) -> bytes:
    return random.Random(n).randbytes(n)


# --- damaged checkpoints, on resume and in evaluate ----------------------------------------------
@pytest.mark.parametrize("damage, needle", [
    (lambda b: b"", "empty (0 bytes)"),
    (lambda b: b[: len(b) // 2], "corrupt or truncated"),
    (lambda b: garbage(len(b)), "corrupt or truncated"),
    (lambda b: json.dumps({"step": 3}).encode(), "corrupt or truncated"),
])
def test_damaged_checkpoint(finished, tmp_path, capsys, damage, needle):
    run = copy_run(finished / "run", tmp_path / "run")
    ckpt = run / CHECKPOINT
    ckpt.write_bytes(damage(ckpt.read_bytes()))
    expect(capsys, ["pretrain", "--out", run, "--resume", "--set", "train.steps=8", "--no-progress"], needle)
    expect(capsys, ["evaluate", "--run", run, "--archs", finished / "archs.txt", "--no-progress"], needle)


def test_checkpoint_that_does_not_fit_the_config(finished, tmp_path, capsys):
    """config.yaml edited to another space: evaluate names the mismatch; resume names the changed key."""
    run = copy_run(finished / "run", tmp_path / "run")
    cfg = load_config(run / "config.yaml", ["space.candidates=[mha:2, ffn:40, conv:3, identity]"])
    save_config(cfg, run / "config.yaml")
    (tmp_path / "archs.txt").write_text(ARCH + "\n")
    expect(capsys, ["evaluate", "--run", run, "--archs", tmp_path / "archs.txt", "--no-progress"], "does not fit the model")
    expect(capsys, ["pretrain", "--out", run, "--resume", "--set", "train.steps=8", "--no-progress"], "space.candidates")


# --- files that are not UTF-8 --------------------------------------------------------------------
def test_files_that_are_not_utf8(finished, tmp_path, capsys):
    latin = "train:\n  steps: 3  # caf\xe9\n".encode("latin-1")
    (tmp_path / "cfg.yaml").write_bytes(latin)
    expect(capsys, ["pretrain", "--config", tmp_path / "cfg.yaml", "--out", tmp_path / "r"], "not UTF-8")
    expect(capsys, ["space", "--config", tmp_path / "cfg.yaml"], "not UTF-8")
    (tmp_path / "archs.txt").write_bytes(ARCH.encode() + b"\n\xff\xfe\n")
    expect(capsys, ["evaluate", "--run", finished / "run", "--archs", tmp_path / "archs.txt", "--no-progress"], "not UTF-8")
    (tmp_path / "est.json").write_bytes(b'{"results": []}\xff')
    expect(capsys, ["rank", "--estimates", tmp_path / "est.json", "--truth", tmp_path / "est.json"], "not UTF-8")


# --- output paths that cannot be used ------------------------------------------------------------
def test_unusable_output_paths(finished, tmp_path, capsys):
    cfg = finished / "micro.yaml"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    expect(capsys, ["pretrain", "--config", cfg, "--out", a_file], "is a file")
    expect(capsys, ["pretrain", "--config", cfg, "--out", a_file / "run"], "is a file")
    expect(capsys, ["pretrain", "--config", cfg, "--out", tmp_path / "r", "--set", f"data.cache_dir={a_file}"], "data.cache_dir")
    expect(capsys, ["sample-archs", "--config", cfg, "--n", "3", "--out", tmp_path], "is a folder")
    archs = finished / "archs.txt"
    expect(capsys, ["evaluate", "--run", finished / "run", "--archs", archs, "--out", tmp_path, "--no-progress"], "is a folder")
    expect(capsys, ["interference", "--run", finished / "run", "--layer", "0", "--candidate", "mha:2", "--out", a_file,
                    "--no-progress"], "is a file")
    expect(capsys, ["ground-truth", "--run", finished / "run", "--archs", archs, "--out", a_file, "--no-progress"], "is a file")
    assert a_file.read_text() == "x"


@pytest.mark.slow
def test_read_only_out_and_checkpoints(finished, tmp_path):
    """Checked before any training: a read-only --out, and a read-only checkpoints/ folder."""
    preexec = unprivileged()
    cfg = finished / "micro.yaml"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    res = cli("pretrain", "--config", cfg, "--out", ro / "run", "--no-progress", preexec_fn=preexec)
    assert res.returncode == 2
    assert_one_line(res.stderr, "not writable")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints").chmod(0o555)
    res = cli("pretrain", "--config", cfg, "--out", out, "--no-progress", preexec_fn=preexec)
    assert res.returncode == 2
    assert_one_line(res.stderr, "cannot write checkpoints")
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()  # stopped before step 1


# --- impossible settings -------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("model.init_std=-1", "model.init_std"),
    ("model.layer_norm_eps=-1", "model.layer_norm_eps"),
    ("train.lr=inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.weight_decay=inf", "train.weight_decay"),
    ("space.candidates=[mha:2]", "two candidates"),
])
def test_impossible_settings(micro_yaml, tmp_path, capsys, override, needle):
    sampler = ["--sampler", "magic-t"] if "candidates" in override else []
    expect(capsys, ["pretrain", "--config", micro_yaml, "--out", tmp_path / "r", "--set", override, *sampler], needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_triton_backend_without_gpu_or_interpreter(micro_yaml, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton can run")
    res = cli("pretrain", "--config", micro_yaml, "--out", tmp_path / "r", "--set", "kernels.backend=triton",
              env={"TRITON_INTERPRET": "0"})
    assert res.returncode == 2
    assert_one_line(res.stderr, "kernels.backend=triton cannot run here")
    assert not (tmp_path / "r").exists()


def test_space_size_beyond_float_range(micro_yaml, capsys):
    assert main(["space", "--config", str(micro_yaml), "--set", "space.layers=600"]) == 0
    assert "e+466 children" in capsys.readouterr().out  # 6 candidates ** 600 layers ~ 10^466.9


def test_rank_with_a_list_for_an_arch(tmp_path, capsys):
    results = {"results": [{"arch": [0, 1, 2], "loss": 1.0, "accuracy": 0.5}]}
    (tmp_path / "est.json").write_text(json.dumps(results))
    expect(capsys, ["rank", "--estimates", tmp_path / "est.json", "--truth", tmp_path / "est.json"], "arch string")


def test_truncated_blocks(finished, tmp_path, capsys):
    run = copy_run(finished / "run", tmp_path / "run")
    blocks = run / "data" / "blocks.npz"
    blocks.write_bytes(blocks.read_bytes()[:5000])
    expect(capsys, ["pretrain", "--out", run, "--resume", "--set", "train.steps=8", "--no-progress"], "corrupt or truncated")
    expect(capsys, ["evaluate", "--run", run, "--archs", finished / "archs.txt", "--no-progress"], "corrupt or truncated")


# --- corpora that are not UTF-8 text -------------------------------------------------------------
def test_binary_and_latin1_corpora(tmp_path, capsys):
    with gzip.open(corpus_files(["default"])[0], "rt") as fh:
        text = fh.read(60000)
    (tmp_path / "binary.txt").write_bytes(garbage(50000))
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_lines([tmp_path / "binary.txt"], None)
    heavy = text.replace("e", "\xe9")  # a latin-1 file where every 'e' is an é
    (tmp_path / "latin1.txt").write_bytes(heavy.encode("latin-1"))
    with pytest.raises(UserError, match="latin-1"):
        read_lines([tmp_path / "latin1.txt"], None)
    light = text[:20000] + " caf\xe9 " + text[20000:]  # one undecodable byte: trained on, with a warning
    (tmp_path / "light.txt").write_bytes(light.encode("latin-1", errors="replace"))
    lines = read_lines([tmp_path / "light.txt"], None)
    assert sum(l.count("\ufffd") for l in lines) == 1
    warning = capsys.readouterr().err
    assert "light.txt" in warning and "not UTF-8" in warning and "1 bytes" in warning
    assert MAX_UNDECODABLE_SHARE * len(light) > 1


# --- SIGINT while starting up --------------------------------------------------------------------
def _torch_loaded(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as fh:
        return "libtorch" in fh.read()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see when start-up is under way")
def test_sigint_during_startup_is_one_line(micro_yaml, tmp_path):
    """Ctrl-C while importing (torch is being loaded: nasfast's main() is running) and while the run
    folder is being prepared (the lock is taken, data and model not yet built)."""
    for moment in ("importing", "preparing"):
        out = tmp_path / moment
        proc = popen("pretrain", "--config", micro_yaml, "--out", out, "--no-progress", "--set", "train.steps=100000")
        ready = (lambda: _torch_loaded(proc.pid)) if moment == "importing" else (lambda: (out / ".lock").exists())
        deadline = time.time() + 120
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        try:
            stdout, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # KNOWN BUG (open): about one SIGINT in three sent ~2-4 s into start-up never reaches Python's
            # handler (no KeyboardInterrupt, no flag; measured with a stress script, see the session note of
            # 2026-12-01) and the run trains on. A second Ctrl-C then stops it cleanly, which this still checks.
            proc.send_signal(signal.SIGINT)
            stdout, err = proc.communicate(timeout=120)
        # -SIGINT: Python reports an interrupt seen inside some C-level imports by re-raising SIGINT at
        # exit, after main() printed its line; a shell shows 130 either way
        assert proc.returncode in (130, -signal.SIGINT), (moment, proc.returncode, err)
        if "SIGINT" in stdout:  # the machine was fast: training had started and stopped cleanly
            assert not err.strip(), err
        else:
            assert_one_line(err, "interrupted")
        assert not (out / "config.yaml").exists() or (out / CHECKPOINT).exists()


def test_fresh_start_never_deletes_a_foreign_data_folder(micro_yaml, tmp_path, capsys):
    out = tmp_path / "project"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("mine")
    expect(capsys, ["pretrain", "--config", micro_yaml, "--out", out], "not a nasfast data folder")
    assert (out / "data" / "notes.txt").read_text() == "mine"
