"""Analysis of trained supernets, separate from the training path.

- ``runs``: open a run folder (config, space, data, supernet weights) without importing the training loop;
- ``estimates``: supernet estimates of children (inherited weights, fixed dev batches);
- ``groundtruth``: children trained from scratch under one pinned protocol, cached per child;
- ``ranking``: Kendall/Spearman rank correlation of estimates against ground truth;
- ``interference``: gradient similarity of a shared operator across children (the paper's observations);
- ``archlist``: reading, writing and stratified sampling of architecture lists;
- ``plots``: matplotlib figures for the above.

May import the leaves, kernels, space, data and training's building blocks (checkpointer, optim,
metrics); never the training loop (trainer, runfolder), engines, nas or cli (tests/test_layout.py).
"""
