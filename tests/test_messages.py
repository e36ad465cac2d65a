"""Issue 29, class 4: messages that tell the truth (what happened, and advice that works)."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
from runhelpers import assert_one_line, cli


# --- parse errors: the subcommand's usage, not the top-level one -----------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from nasfast.cli.app import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _required_args(parser: argparse.ArgumentParser) -> list[str]:
    """Plausible values for every required flag, so that only the hostile argument is wrong."""
    args: list[str] = []
    for action in parser._actions:
        if action.required and action.option_strings:
            args += [action.option_strings[0], "1" if action.type in (int, float) else "x"]
    return args


def _parse_error(capsys, argv: list[str]) -> tuple[int, str]:
    from nasfast.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


COMMANDS = sorted(_subparsers())


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_prints_the_subcommands_usage(command, capsys):
    parser = _subparsers()[command]
    code, err = _parse_error(capsys, [command, *_required_args(parser), "--bogus"])
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith(f"usage: nasfast {command} "), err
    assert lines[-1] == f"nasfast {command}: error: unrecognized arguments: --bogus", err


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_required_flag_and_bad_int_print_the_subcommands_usage(command, capsys):
    parser = _subparsers()[command]
    required = [a for a in parser._actions if a.required and a.option_strings]
    code, err = _parse_error(capsys, [command])
    assert code == 2 and err.startswith(f"usage: nasfast {command} ") and "the following arguments are required" in err, err
    ints = [a for a in parser._actions if a.type is int and a.option_strings and not a.required]
    if ints:
        code, err = _parse_error(capsys, [command, *_required_args(parser), ints[0].option_strings[0], "abc"])
        assert code == 2 and err.startswith(f"usage: nasfast {command} "), err
        assert err.strip().splitlines()[-1].startswith(f"nasfast {command}: error: argument {ints[0].option_strings[0]}"), err
    assert required or command == "pretrain"  # every command but pretrain (--config or --resume) has one


@pytest.mark.slow
def test_unknown_flag_real_cli():
    res = cli("pretrain", "--out", "x", "--bogus", "--stop-after", "2")
    assert res.returncode == 2 and res.stderr.startswith("usage: nasfast pretrain "), res.stderr
    assert res.stderr.strip().splitlines()[-1] == "nasfast pretrain: error: unrecognized arguments: --bogus"
    assert "Traceback" not in res.stderr


# --- divergence before the first checkpoint ---------------------------------------------------------
def test_divergence_without_a_checkpoint_says_start_again_and_that_works(tmp_path, micro_yaml, capsys):
    from nasfast.cli.app import main

    out = tmp_path / "run"
    code = main(["pretrain", "--no-progress", "--config", str(micro_yaml), "--out", str(out), "--set", "train.lr=1e6",
                 "--set", "train.clip_norm=0", "--set", "train.ckpt_every=100", "--set", "train.steps=12",
                 "--set", "train.eval_every=100"])
    err = capsys.readouterr().err
    line = assert_one_line(err, "no checkpoint was written")
    assert code == 1 and "then --resume" not in line, line
    assert "start the run again without --resume (same --out)" in line
    summary = json.loads((out / "summary.json").read_text())
    assert "without --resume" in summary["message"]
    # the advice works: the same command in the same folder, with a sane lr
    code = main(["pretrain", "--no-progress", "--config", str(micro_yaml), "--out", str(out), "--set", "train.lr=1e-3"])
    assert code == 0, capsys.readouterr().err


# --- --resume of a folder another process holds ------------------------------------------------------
@pytest.mark.slow
def test_resume_of_a_locked_folder_without_checkpoint_names_the_holder(tmp_path):
    from nasfast.training.runfolder import RunFolder

    out = tmp_path / "run"
    holder = RunFolder(out)
    holder.open(resume=False)  # a first start that has not written its first checkpoint yet
    try:
        res = cli("pretrain", "--out", out, "--resume", "--no-progress")
        assert res.returncode == 2
        line = assert_one_line(res.stderr, f"is in use by another nasfast process (pid {os.getpid()} on ")
        assert "no checkpoint" not in line and "stopped" not in line, line
    finally:
        holder.release()
    res = cli("pretrain", "--out", out, "--resume", "--no-progress")  # released: now the truth is "no checkpoint"
    assert res.returncode == 2
    assert_one_line(res.stderr, "no checkpoint")


# --- two prepare-data --out SAME ----------------------------------------------------------------------
def test_prepare_that_loses_the_race_reports_the_hash_of_the_data_there(tmp_path, micro_yaml, capsys, monkeypatch):
    """Another prepare of the same folder renames its copy into place first (with a different content
    hash: WordPiece training may differ); the loser discards its copy and must report the winner's hash."""
    import nasfast.data.prepare as prep
    from nasfast.cli.app import main

    out = tmp_path / "prep"
    winner = "f" * 64

    def other_process_wins(name: str) -> None:
        if name == "prepare:before-rename":
            tmp = next(tmp_path.glob(".prep.tmp-*"))
            shutil.copytree(tmp, out)
            manifest = json.loads((out / "manifest.json").read_text())
            (out / "manifest.json").write_text(json.dumps({**manifest, "hash": winner}))

    monkeypatch.setattr(prep, "kill_point", other_process_wins)
    code = main(["prepare-data", "--config", str(micro_yaml), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and f"(hash {winner[:12]})" in printed, printed
    assert not list(tmp_path.glob(".prep.tmp-*"))  # the loser's copy is gone


def test_resume_with_a_bad_value_in_the_saved_config_names_the_file(tmp_path, micro_yaml, capsys):
    from nasfast.cli.app import main

    out = tmp_path / "run"
    assert main(["pretrain", "--no-progress", "--config", str(micro_yaml), "--out", str(out), "--stop-after", "2"]) == 0
    saved = out / "config.yaml"
    saved.write_text(saved.read_text().replace("lr: 0.001", "lr: fast"))
    capsys.readouterr()
    assert main(["pretrain", "--no-progress", "--out", str(out), "--resume"]) == 2
    assert_one_line(capsys.readouterr().err, f"error: {saved}: config key 'train.lr' must be a number, got 'fast'")
