"""A full or read-only disk is the user's environment, not a bug (issue 29): every command that writes exits
with status 2 and one line naming the path and the free space on its file system (or the read-only
mount), and the last good state stays in force (previous checkpoint, cache entry, export, plot).

The disks are real: small tmpfs mounts under tmp_path (root with CAP_SYS_ADMIN; skipped otherwise), so
each fault comes from the kernel through the library's own write path (torch.save's zip writer,
safetensors, matplotlib, the JSON writers), not from a mock.
"""
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import MICRO_OVERRIDES
from runhelpers import assert_one_line, cli

from nasfast.config import load_config
from nasfast.training.checkpointer import CHECKPOINT, read_checkpoint
from nasfast.training.metrics import read_metrics
from nasfast.training.trainer import Trainer

ARCHS = ["mha:2|ffn:40|identity", "conv:3|mha:3|conv:5", "identity|identity|ffn:40"]


class SmallDisk:
    """A tmpfs mounted at ``path``: resizable, fillable, remountable read-only."""

    def __init__(self, path: Path):
        self.path = path

    def _mount(self, *args: str) -> None:
        subprocess.run(["mount", *args, str(self.path)], check=True, capture_output=True)

    def resize(self, size: str) -> None:
        self._mount("-o", f"remount,size={size}")

    def read_only(self) -> None:
        self._mount("-o", "remount,ro")

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bfree * st.f_frsize

    def fill(self, leave: int = 0) -> Path:
        """A filler file taking all but ``leave`` bytes (all of them: until the kernel says ENOSPC)."""
        filler = self.path / "filler"
        todo = self.free() - leave if leave else None
        with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush at close
            try:
                while todo is None or todo > 0:
                    written = fh.write(b"\0" * min(1 << 16, todo or 1 << 16))
                    todo = None if todo is None else todo - written
            except OSError as exc:
                assert exc.errno == errno.ENOSPC and todo is None, exc
        return filler


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (and mount(8)); the disk-full tests need a real small disk")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the disk-full tests need CAP_SYS_ADMIN")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A trained micro run (on the ordinary disk), its config file and an arch list."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diskfull")
    cfg = load_config(None, MICRO_OVERRIDES + ["train.eval_every=6", "train.ckpt_every=6"])
    Trainer(cfg, root / "run", progress=False).train()
    (root / "archs.txt").write_text("\n".join(ARCHS) + "\n")
    return root


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp*"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- pretrain -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_matches(disk, micro_yaml, micro_config, tmp_path):
    disk.resize("900k")  # data/ and the step-2 checkpoint fit; the step-4 temp file beside it does not
    out = disk.path / "run"
    first = cli("pretrain", "--config", micro_yaml, "--out", out, "--no-progress")
    assert first.returncode == 2, first.stderr
    line = assert_one_line(first.stderr, f"nasfast pretrain: error: no space left on device writing {out / CHECKPOINT} (")
    assert f"free on {disk.path}); free space, then rerun with --resume" in line and "step 2" in line, line
    assert read_checkpoint(out / CHECKPOINT)["step"] == 2  # the last good checkpoint, complete and loadable
    assert temp_leftovers(out) == []  # the partial temp file was removed

    disk.resize("16m")  # space freed
    again = cli("pretrain", "--out", out, "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr
    torch.set_num_threads(1)  # the CLI's thread count: the reference is bitwise comparable
    Trainer(micro_config, tmp_path / "ref", progress=False).train()
    a, b = read_checkpoint(tmp_path / "ref" / CHECKPOINT), read_checkpoint(out / CHECKPOINT)
    assert b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))  # none lost, none twice


@pytest.mark.slow
def test_full_disk_before_any_checkpoint_says_to_run_the_same_command(disk, micro_yaml):
    disk.resize("400k")  # not even the first checkpoint fits: --resume would find nothing to resume
    out = disk.path / "run"
    argv = ["pretrain", "--config", micro_yaml, "--out", out, "--no-progress"]
    first = cli(*argv)
    assert first.returncode == 2, first.stderr
    line = assert_one_line(first.stderr, "nasfast pretrain: error: no space left on device writing ")
    assert line.endswith("free space, then run the same command again") and "--resume" not in line, line
    assert not (out / CHECKPOINT).exists() and temp_leftovers(out) == []
    disk.resize("16m")
    assert cli(*argv).returncode == 0


# --- export (safetensors) ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_on_a_full_disk_keeps_the_earlier_export(disk, micro_run):
    out = disk.path / "child"
    argv = ["export", "--run", micro_run / "run", "--arch", ARCHS[1], "--out", out]
    assert cli(*argv).returncode == 0
    before = snapshot(out)
    disk.fill(leave=16 * 1024)  # less than model.safetensors
    second = cli(*argv)
    assert second.returncode == 2, second.stderr
    line = assert_one_line(second.stderr, f"nasfast export: error: no space left on device writing {out} (")
    assert f"free on {disk.path}); free space, then run the command again" in line, line
    assert snapshot(out) == before  # the earlier export is still whole
    assert temp_leftovers(disk.path) == []


# --- prepare-data (tokenizer, token blocks, manifest into a temp folder) ---------------------------------
@pytest.mark.slow
def test_prepare_data_on_a_full_disk_leaves_no_half_folder(disk, micro_yaml):
    out = disk.path / "prepared"
    disk.fill(leave=16 * 1024)  # the tokenizer fits, the token blocks do not
    proc = cli("prepare-data", "--config", micro_yaml, "--out", out, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    line = assert_one_line(proc.stderr, f"nasfast prepare-data: error: no space left on device writing {out} (")
    assert f"free on {disk.path}); free space, then run the command again" in line, line
    assert sorted(p.name for p in disk.path.iterdir()) == ["filler"]  # the temp folder is gone


# --- an analysis command's cache and JSON -----------------------------------------------------------------
@pytest.mark.slow
def test_ground_truth_on_a_full_disk_keeps_its_cache_and_resumes(disk, micro_run):
    gt = disk.path / "gt"
    argv = ["ground-truth", "--run", micro_run / "run", "--archs", micro_run / "archs.txt", "--steps", "2",
            "--dev-batches", "1", "--out", gt, "--no-progress"]
    assert cli(*argv, "--limit", "1").returncode == 0
    cached = snapshot(gt / "cache")
    filler = disk.fill()
    second = cli(*argv)
    assert second.returncode == 2, second.stderr
    line = assert_one_line(second.stderr, f"nasfast ground-truth: error: no space left on device writing {gt / 'cache'}/")
    assert f"free on {disk.path});" in line, line
    assert snapshot(gt / "cache") == cached and temp_leftovers(gt) == []
    filler.unlink()
    third = cli(*argv)
    assert third.returncode == 0, third.stderr
    assert "2 trained, 1 cached" in third.stdout


# --- a plot (matplotlib) ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_plot_on_a_full_disk_leaves_no_torn_png(disk, tmp_path):
    results = [{"arch": f"a{i}", "loss": 5.0 + i / 10, "accuracy": 0.1 - i / 100} for i in range(6)]
    estimates, truth = tmp_path / "estimates.json", tmp_path / "truth.json"
    estimates.write_text(json.dumps({"results": results}))
    truth.write_text(json.dumps({"results": results[::-1]}))
    out = disk.path / "rank"
    out.mkdir()
    disk.fill(leave=8 * 1024)  # rank.json fits, the PNG does not
    proc = cli("rank", "--estimates", estimates, "--truth", truth, "--out", out)
    assert proc.returncode == 2, proc.stderr
    line = assert_one_line(proc.stderr, f"nasfast rank: error: no space left on device writing {out / 'rank_scatter.png'} (")
    assert f"free on {disk.path});" in line, line
    assert json.loads((out / "rank.json").read_text())["kendall"]["n"] == 6  # what was written is whole
    assert sorted(p.name for p in out.iterdir()) == ["rank.json"]  # no half PNG, no temp file


# --- a read-only file system ------------------------------------------------------------------------------
@pytest.mark.slow
def test_read_only_disk_is_named_before_any_work(disk, micro_run):
    run = disk.path / "run"
    shutil.copytree(micro_run / "run", run)
    (run / ".lock").unlink(missing_ok=True)
    before = snapshot(run)
    disk.read_only()
    proc = cli("evaluate", "--run", run, "--archs", micro_run / "archs.txt", "--dev-batches", "1", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, f"nasfast evaluate: error: read-only file system writing {run / 'estimates.json'} "
                                 f"({disk.path} is mounted read-only); remount it read-write, then run the command again")
    assert snapshot(run) == before


# --- errnos a tmpfs cannot produce, and errnos libraries hide ---------------------------------------------
def test_quota_and_hidden_errnos_are_recognised(tmp_path):
    from nasfast.files import StorageError, writing

    target = tmp_path / "x.json"
    with pytest.raises(StorageError, match=rf"^disk quota exceeded writing {target} \(.* free on /.*\); free space"):
        with writing(target):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    try:  # torch.save to a file object: a RuntimeError raised while handling the OSError
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as hidden:
        with pytest.raises(StorageError, match="^no space left on device writing"):
            with writing(target):
                raise hidden
    with pytest.raises(StorageError, match="^no space left on device writing"):  # safetensors: only the text
        with writing(target):
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(RuntimeError, match="a bug"):  # anything else passes unchanged (plenty of space here)
        with writing(target):
            raise RuntimeError("a bug")
