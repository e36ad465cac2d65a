"""The command line (``nasfast COMMAND``): ``app`` builds the parser and runs pretrain / prepare-data /
space; ``analysis`` and ``nas`` add the other commands; ``common`` holds shared flags. The top layer:
it may import everything, and nothing imports it."""


def main(argv=None) -> int:
    """The ``nasfast`` console script (kept at ``nasfast.cli:main`` so installed scripts keep working)."""
    from nasfast.cli.app import main as run

    return run(argv)
