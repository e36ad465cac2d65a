"""Overlapped loading: step s+1's micro-batches are built on a background thread while step s computes.

A batch is a pure function of (seed, step, micro, rank) (``Corpus.train_batch``), so building it early,
late or twice gives the same tensors: prefetching cannot change a run, and a resume needs no loader
state. The thread only slices the memory-mapped blocks and draws the masks (numpy and torch release the
GIL there); on CUDA the batch is put in pinned memory so the copy to the device is asynchronous.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from nasfast.data.blocks import Corpus
from nasfast.distributed import World

Batches = list  # [(seed, batch dict)] of one step's micro-batches, on the CPU


class StepLoader:
    """``get(step)`` returns step ``step``'s micro-batches on ``device`` and starts building ``step + 1``."""

    def __init__(self, corpus: Corpus, t, device: torch.device, world: World = World(), prefetch: bool = True,
                 last_step: Optional[int] = None):
        self.corpus, self.t, self.device, self.world = corpus, t, device, world
        self.pin = prefetch and device.type == "cuda"
        self.last_step = t.steps if last_step is None else last_step
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nasfast-data") if prefetch else None
        self._pending: dict[int, Future] = {}
        self.wait_s = 0.0  # time the training loop spent waiting for batches

    def build(self, step: int) -> Batches:
        out = []
        for micro in range(self.t.grad_accum):
            seed, batch = self.corpus.train_batch(self.t.seed, step, micro, self.t.grad_accum, self.t.batch_size, self.world)
            if self.pin:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            out.append((seed, batch))
        return out

    def get(self, step: int) -> list[tuple[int, dict]]:
        started = time.perf_counter()
        future = self._pending.pop(step, None)
        batches = future.result() if future is not None else self.build(step)
        for stale in self._pending.values():  # a jump (resume, evaluation replay): the guess was wrong
            stale.cancel()
        self._pending.clear()
        if self._pool is not None and step + 1 < self.last_step:
            self._pending[step + 1] = self._pool.submit(self.build, step + 1)
        on_device = [(seed, {k: v.to(self.device, non_blocking=self.pin) for k, v in batch.items()}) for seed, batch in batches]
        self.wait_s += time.perf_counter() - started
        return on_device

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "StepLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

