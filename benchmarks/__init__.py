"""Speed benchmarks of nasfast (run from the repository root: ``python -m benchmarks.NAME``); their
results, each with its command and machine, are in ``benchmarks/results/`` (index: ``benchmarks/README.md``)."""
