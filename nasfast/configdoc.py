"""docs/configuration.md's key reference, generated from the help texts of ``nasfast.config``'s fields.

``python -m nasfast.configdoc docs/configuration.md`` rewrites the generated block in place;
``tests/test_docs.py`` fails when the committed page and the generated one differ.
"""
from __future__ import annotations

import sys
from pathlib import Path

from nasfast.config import config_reference

BEGIN_GENERATED = "<!-- generated from nasfast/config.py by `python -m nasfast.configdoc docs/configuration.md`; do not edit -->"
END_GENERATED = "<!-- end of generated reference -->"


def with_reference(page: str) -> str:
    """``page`` (docs/configuration.md's text) with its generated block replaced by today's reference."""
    head, sep, rest = page.partition(BEGIN_GENERATED)
    _, sep2, tail = rest.partition(END_GENERATED)
    if not (sep and sep2):
        raise ValueError("the page has no generated-reference markers")
    return f"{head}{BEGIN_GENERATED}\n\n{config_reference()}\n{END_GENERATED}{tail}"


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.write_text(with_reference(target.read_text()))
