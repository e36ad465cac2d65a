"""User-facing errors: the CLI prints one line and exits with status 2, no traceback."""


class UserError(Exception):
    """Bad input from the user: a config, a path, an arch string, a corpus."""
