"""Data: text sources (txt, jsonl, parquet, saved datasets), streaming tokenization into prepared
memory-mapped blocks, the run's corpus (train/dev/anchor splits, masking, micro-batches) and the
prefetching step loader. Imports only the leaves; never space, training, engines, nas or cli."""

from nasfast import _moved

__getattr__ = _moved.forward_old_names(__name__, "nasfast.data.blocks")
