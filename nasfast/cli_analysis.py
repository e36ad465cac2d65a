"""Analysis commands (interference, ground truth, evaluate, rank): parsers and handlers."""
from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to the ``nasfast`` parser."""
