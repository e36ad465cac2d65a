"""Data: text sources (txt, jsonl, parquet, saved datasets), streaming tokenization into prepared
memory-mapped blocks, the run's corpus (train/dev/anchor splits, masking, micro-batches) and the
prefetching step loader. Imports only the leaves; never space, training, engines, nas or cli."""
