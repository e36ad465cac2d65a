"""What every command module shares: the command registry and quiet library logging.

``app`` assembles the parser from the command modules (``app`` itself for training, ``analysis``,
``nas``); the modules import only this one, so there is no import cycle between them.
"""
from __future__ import annotations

import os
from typing import Callable

COMMANDS: dict[str, Callable] = {}


def command(name: str):
    def register(fn: Callable) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bar()
    datasets.logging.set_verbosity_error()
