"""User-facing errors: the CLI prints one line and exits with status 2, no traceback."""
from __future__ import annotations

import sys

# Where the CLI tells users to report an internal error (an exception that is not a UserError).
BUG_REPORT = "the nasfast issue tracker"


class UserError(Exception):
    """Bad input from the user: a config, a path, an arch string, a corpus."""


def require(condition: bool, message: str) -> None:
    """Raise ``UserError(message)`` unless ``condition``: one line per check in the config checks."""
    if not condition:
        raise UserError(message)


def warn(message: str) -> None:
    """One line on stderr that does not stop the command."""
    print(f"nasfast: warning: {message}", file=sys.stderr, flush=True)
