"""The user documentation holds together: README stays short, and every link it and docs/ make resolves."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", ROOT / "experiments" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short_enough_to_start_from():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_docs_index_lists_every_page():
    readme = (ROOT / "README.md").read_text()
    assert not [p.name for p in (ROOT / "docs").glob("*.md") if f"(docs/{p.name})" not in readme]


def test_the_configuration_reference_is_generated_from_config_py():
    from nasfast.configdoc import with_reference

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == with_reference(page), "docs/configuration.md is stale: python -m nasfast.configdoc docs/configuration.md"


def test_every_config_key_has_one_help_text():
    from nasfast.config import config_keys

    keys = config_keys()
    assert len(keys) >= 50 and not [k for k, _, help in keys if len(help) < 8]


@pytest.mark.slow
def test_pretrain_help_config_prints_the_same_help_texts():
    from runhelpers import cli

    from nasfast.config import config_keys

    res = cli("pretrain", "--help-config")  # no --out needed: it only lists
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [l.split(" ", 1)[0] for l in lines] == [k for k, _, _ in config_keys()]
    assert "train.warmup_steps (default 30): linear warm-up steps" in res.stdout
