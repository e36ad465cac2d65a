"""Every benchmark and experiment command quoted in the index READMEs and the results files still runs: its
module imports as a package module (no sys.path edits), and its --help lists every flag the quote uses.
(A smoke test of the command lines; running each at full size is what its results file records.)"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUOTED = re.compile(r"python -m ((?:benchmarks|experiments)\.[a-z][a-z0-9_]*)([^`\"\n|]*)")


def quoted_commands() -> dict[tuple[str, str], set[str]]:
    """(module, subcommand or '') -> the --flags quoted with it, over the READMEs and results files."""
    pages = [ROOT / "benchmarks" / "README.md", ROOT / "experiments" / "README.md"]
    pages += [p for folder in ("benchmarks/results", "experiments/results") for p in (ROOT / folder).rglob("*")
              if p.suffix in (".md", ".json")]
    found: dict[tuple[str, str], set[str]] = {}
    for page in pages:
        for module, rest in QUOTED.findall(page.read_text()):
            try:
                words = shlex.split(rest.split(";")[0].split("#")[0])
            except ValueError:  # an unbalanced quote cut by the regex
                words = rest.split()
            sub = words[0] if words and re.fullmatch(r"[a-z][a-z-]*", words[0]) else ""
            flags = {w.split("=")[0] for w in words if w.startswith("--")}
            found.setdefault((module, sub), set()).update(flags)
    return found


COMMANDS = quoted_commands()


def test_the_scan_finds_the_benchmarks_and_experiments():
    modules = {m for m, _ in COMMANDS}
    assert {"benchmarks.vs_transformers", "benchmarks.native_vs_eager", "experiments.magic_test",
            "experiments.search_finetune"} <= modules


def test_no_script_edits_sys_path():
    scripts = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("experiments/*.py")]
    assert not [p.name for p in scripts if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]


@pytest.mark.slow
@pytest.mark.parametrize("module,sub", sorted(COMMANDS), ids=lambda v: v or "-")
def test_quoted_command_parses(module, sub):
    res = subprocess.run([sys.executable, "-m", module, *([sub] if sub else []), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()})
    assert res.returncode == 0, res.stderr[-2000:]
    missing = [f for f in COMMANDS[(module, sub)] if not re.search(re.escape(f) + r"(?![\w-])", res.stdout)]
    assert not missing, f"python -m {module} {sub}: --help lacks {missing}"


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
