"""Research pipelines built on nasfast (run from the repository root: ``python -m experiments.NAME``);
their results are in ``experiments/results/`` (index: ``experiments/README.md``)."""
