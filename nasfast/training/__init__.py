"""Training: the loop (``trainer``), optimizer and LR schedule, checkpoints, the run folder (lock,
resume rules) and metrics (log, curves). May import the leaves, kernels, space, data and engines;
never nas or cli. Only ``trainer`` imports the engines."""
