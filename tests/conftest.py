"""Shared fixtures: a micro config and corpus that build in about a second."""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run through the interpreter, which must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "NASFAST_CACHE" not in os.environ:  # tests never touch the user's cache
    import tempfile

    os.environ["NASFAST_CACHE"] = tempfile.mkdtemp(prefix="nasfast-test-cache-")

from pathlib import Path

import datasets
import pytest
import torch

from nasfast.config import Config, load_config
from nasfast.space.searchspace import SearchSpace

datasets.disable_progress_bar()

MICRO_OVERRIDES = [
    "model.hidden=24",
    "model.max_len=32",
    "model.dropout=0.1",
    "space.layers=3",
    "space.candidates=[mha:2, mha:3, ffn:40, conv:3, conv:5, identity]",
    "data.max_chars_per_file=40000",
    "data.vocab_size=400",
    "data.block_size=32",
    "data.dev_blocks=16",
    "train.steps=6",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.eval_random_children=1",
    "train.ckpt_every=2",
    "train.device=cpu",
    "kernels.backend=eager",
]


@pytest.fixture
def micro_config() -> Config:
    return load_config(None, MICRO_OVERRIDES)


@pytest.fixture
def micro_space() -> SearchSpace:
    cfg = load_config(None, MICRO_OVERRIDES)  # the one candidate list of the micro setup
    return SearchSpace.from_names(cfg.space.layers, cfg.space.candidates, cfg.model.hidden)


@pytest.fixture(scope="session")
def micro_corpus():
    from nasfast.data.blocks import build_corpus

    return build_corpus(load_config(None, MICRO_OVERRIDES).data)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def micro_yaml(tmp_path, micro_config) -> Path:
    from nasfast.config import save_config

    path = tmp_path / "micro.yaml"
    save_config(micro_config, path)
    return path


# Hypothesis profiles of the property-based kernel tests (tests/test_kernel_properties.py):
# "ci" (default) keeps the Triton interpreter within CI's budget and is derandomized (the same
# examples every run); "deep" is for a manual run: pytest --hypothesis-profile=deep, or
# NASFAST_HYPOTHESIS_PROFILE=deep.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, database=None,
                                   print_blob=True)
    _hyp_settings.register_profile("deep", max_examples=400, deadline=None, database=None, print_blob=True)
    _hyp_settings.load_profile(os.environ.get("NASFAST_HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a dev extra; the property tests skip without it
    pass
