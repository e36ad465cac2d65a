"""Config checks that need the registries: candidate names and head divisibility, samplers and
their walks, MAGIC-A anchors, kernels backends. ``config.py`` stays plain dataclasses and field checks,
so every module can read a config without importing a registry."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from nasfast.config import Config, load_config
from nasfast.errors import UserError, require, warn
from nasfast.kernels.registry import known_backends
from nasfast.space.alignment import anchor_init_count
from nasfast.space.samplers import SAMPLERS, WALKS, build_sampler
from nasfast.space.searchspace import SearchSpace


def build_space(cfg: Config) -> SearchSpace:
    return SearchSpace.from_names(cfg.space.layers, cfg.space.candidates, cfg.model.hidden)


def load_run_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> Config:
    """``load_config`` plus ``check_config``: what every command that runs a config uses."""
    cfg = load_config(path, overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Raise a one-line ``UserError`` for a value no registry knows or a space cannot support."""
    d, t = cfg.data, cfg.train

    backends = known_backends()  # the built-ins and any registered backend
    require(cfg.kernels.backend in backends, f"kernels.backend must be one of {', '.join(backends)}, got '{cfg.kernels.backend}'")
    require(cfg.sampler.name in SAMPLERS, f"sampler.name must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler.name}'")
    space = build_space(cfg)  # candidate names, head divisibility
    sc, al = cfg.sampler, cfg.align
    require(1 <= sc.k <= space.num_layers, f"sampler.k must be in [1, space.layers={space.num_layers}], got {sc.k}")
    require(al.weight >= 0, f"align.weight must be >= 0, got {al.weight}")
    require(al.anchor_every > 0, f"align.anchor_every must be positive, got {al.anchor_every}")
    require(al.anchor_precision in ("fp32", "bf16"),
            f"align.anchor_precision must be fp32 or bf16, got {al.anchor_precision!r}")

    require(sc.walk in WALKS, f"sampler.walk must be one of {', '.join(WALKS)}, got '{sc.walk}'")
    require(al.anchor_warmup is None or 0 <= al.anchor_warmup < t.steps,
         f"align.anchor_warmup must be null or in [0, train.steps={t.steps}), got {al.anchor_warmup}")
    try:
        is_best = anchor_init_count(al.anchor_init) is not None
    except ValueError as exc:
        raise UserError(f"align.anchor_init: {exc}") from None
    if al.anchor_init not in ("largest", "random") and not is_best:
        fixed = space.parse(al.anchor_init)  # raises UserError naming the problem
        if SAMPLERS[sc.name].aligns and space.context_candidates and not space.has_context(fixed):
            warn(f"align.anchor_init '{al.anchor_init}' has no attention or convolution layer: it sees each token "
                 "alone (unigram statistics only), a poor MAGIC-A anchor")
    if SAMPLERS[sc.name].aligns:
        require(d.anchor_blocks > 0, f"sampler '{sc.name}' (MAGIC-A) needs an anchor-selection split disjoint from "
                                  "the dev data: set data.anchor_blocks (e.g. 64) below data.dev_blocks")

    try:  # what a sampler itself requires of the space (e.g. MAGIC-T: two candidates to move between)
        build_sampler(sc.name, space, t.seed, k=sc.k, walk=sc.walk)
    except ValueError as exc:
        raise UserError(f"sampler.name={sc.name}: {exc}") from None
