"""Run configuration: a tree of small dataclasses loaded from YAML, overridable with --set.

Validated once at start-up; every problem raises UserError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from nasfast.errors import UserError, require


@dataclass
class ModelConfig:
    hidden: int = 128
    max_len: int = 128  # position embeddings
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02


@dataclass
class SpaceConfig:
    layers: int = 6
    candidates: list = field(
        default_factory=lambda: ["mha:2", "mha:4", "mha:8", "ffn:256", "ffn:512", "conv:3", "conv:5", "conv:7", "identity"]
    )


@dataclass
class DataConfig:
    corpus: list = field(default_factory=lambda: ["default"])  # "default" = embedded corpus, or files/dirs
    max_chars_per_file: Optional[int] = None  # cap text read per file (None: all)
    vocab_size: int = 8192
    lowercase: bool = True
    block_size: int = 128
    mlm_probability: float = 0.15
    dev_blocks: int = 256
    # Of the dev blocks, the last ``anchor_blocks`` form MAGIC-A's anchor-selection split; they are
    # never used for evaluation (estimates, ground truth, dev curves), so choosing the anchor does not
    # peek at the data the ranking is judged on.
    anchor_blocks: int = 0
    # A folder made by `nasfast prepare-data` (memory-mapped blocks + manifest), or one with tokenizer/
    # and blocks.npz (e.g. a run's data/ folder): use exactly these tokens instead of tokenizing
    # data.corpus. WordPiece training differs between machines, so this is how an experiment pins its
    # data across machines, and how large corpora are tokenized once for many runs.
    prepared: Optional[str] = None
    cache_dir: Optional[str] = None  # tokenized-corpus cache (default $NASFAST_CACHE or ~/.cache/nasfast)
    text_column: str = "text"  # the text field of .jsonl / .parquet / saved-dataset inputs
    # An existing local Hugging Face tokenizer folder (e.g. a BERT WordPiece vocabulary) instead of
    # training one here; vocab_size and lowercase are then the tokenizer's own.
    tokenizer: Optional[str] = None
    tokenizer_sample_chars: int = 100_000_000  # text the tokenizer is trained on, split evenly over inputs
    # A run folder keeps its own copy of data this small (tokens, MB) so it does not depend on the cache;
    # larger data are recorded by path and content hash (resume/evaluate refuse a different hash).
    copy_max_mb: float = 64.0
    num_proc: int = 1  # tokenizer processes when pretrain prepares the data itself
    prefetch: bool = True  # build step s+1's batches on a background thread while step s computes


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # linear decay to lr * min_lr_ratio at the last step
    clip_norm: float = 1.0
    bf16: bool = False
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    eval_random_children: int = 3
    ckpt_every: int = 100
    deepspeed: Optional[str] = None  # a DeepSpeed JSON (ZeRO-1/2/3, e.g. configs/ds/zero2.json); None = the plain engine


@dataclass
class SamplerConfig:
    name: str = "spos"  # spos | magic-t | magic-a | magic
    k: int = 1  # MAGIC-T: layers changed per step (1 = the paper's; k = layers forces every layer to change, not SPOS)
    walk: str = "uniform"  # MAGIC-T: uniform | balanced (shuffled round-robin layers, least-visited candidate)


@dataclass
class AlignConfig:
    """MAGIC-A's alignment loss; used by the samplers whose ``aligns`` is true (magic-a, magic)."""

    weight: float = 0.1  # λ of the alignment term
    anchor_every: int = 20  # steps between anchor challenges (anchor and child re-scored together)
    anchor_init: str = "best:8"  # best:N (best of N random children) | random | largest | an arch string
    anchor_warmup: Optional[int] = None  # steps before the anchor is chosen and alignment starts (None: 10% of train.steps)
    prefix_sharing: bool = True  # share the child/anchor common prefix of layers (exact)
    # fp32 | bf16: bf16 runs the anchor's no-grad forward under bf16 autocast (its matmuls ~7x faster on
    # an AMX CPU; on GPUs bf16 is the usual precision anyway); the target is then rounded to bf16
    # precision. The anchor challenge always scores in the training precision.
    anchor_precision: str = "fp32"

    def warmup_steps(self, total_steps: int) -> int:
        return total_steps // 10 if self.anchor_warmup is None else self.anchor_warmup


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | eager | triton | native (auto: triton on CUDA, native C++ on CPU)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a YAML value against a field's annotation (int, float, bool, str, list, Optional[...])."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if annotation in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation in (float, "float"):
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if annotation in (bool, "bool"):
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation in (str, "str"):
        if not isinstance(value, str):
            raise UserError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if annotation in (list, "list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return value
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Keys that no longer exist, with what replaced them (a clear message instead of "unknown key").
REMOVED_KEYS = {
    "sampler.anchor_dev_batches": "the anchor is now scored on its own split: set data.anchor_blocks "
                                  "(dev blocks reserved for anchor selection, disjoint from evaluation)",
}


# Keys that moved, old name -> new name: still read (run folders and checkpoints saved before the move
# resume unchanged), with a one-time deprecation message.
MOVED_KEYS = {
    "sampler.align_weight": "align.weight",
    "sampler.anchor_every": "align.anchor_every",
    "sampler.anchor_init": "align.anchor_init",
    "sampler.anchor_warmup": "align.anchor_warmup",
    "sampler.prefix_sharing": "align.prefix_sharing",
}
_warned: set[str] = set()


def moved_key(name: str) -> str:
    """The current name of a config key (``name`` itself unless it moved); says so once per process."""
    new = MOVED_KEYS.get(name)
    if new is None:
        return name
    if name not in _warned:
        _warned.add(name)
        print(f"nasfast: config key '{name}' is deprecated, use '{new}' (read as '{new}')", file=sys.stderr)
    return new


def migrate(tree: dict) -> dict:
    """A saved config dict with moved keys renamed (for comparing old checkpoints with today's config)."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in tree.items()}
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        if isinstance(out.get(old_section), dict) and old_key in out[old_section]:
            new_section, new_key = new.split(".")
            out.setdefault(new_section, {})[new_key] = out[old_section].pop(old_key)
    return out


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    section, _, key = moved_key(f"{section}.{key}").partition(".")
    if f"{section}.{key}" in REMOVED_KEYS:
        raise UserError(f"config key '{section}.{key}' was removed: {REMOVED_KEYS[f'{section}.{key}']}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise UserError(f"unknown config section '{section}' (allowed: {', '.join(sections)})")
    obj = getattr(cfg, section)
    types = _section_types(type(obj))
    if key not in types:
        raise UserError(f"unknown config key '{section}.{key}' (allowed: {', '.join(types)})")
    setattr(obj, key, _coerce(f"{section}.{key}", value, types[key]))


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file <- ``--set section.key=value`` overrides, then the field checks of ``validate``.

    Checks that need a registry (candidate names, samplers, backends, anchors) are
    ``nasfast.space.checks.check_config``; ``load_run_config`` there runs both."""
    cfg = Config()
    if path is not None:
        from nasfast.files import read_text

        path = Path(path)
        if not path.exists():
            raise UserError(f"config file not found: {path}")
        text = read_text(path, "config")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise UserError(f"config {path} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config {path} must be a mapping of sections")
        for section, values in raw.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise UserError(f"config section '{section}' must be a mapping, got {values!r}")
            for key, value in values.items():
                _apply(cfg, section, key, value)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set expects section.key=value, got '{item}'")
        section, _, name = key.strip().partition(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _apply(cfg, section, name, value)
    validate(cfg)
    return cfg


# Upper bounds of sizes where a larger value can only be a typo (an extra 0 or three): refused at load,
# before a model, a batch or a pool is sized by it. Well above BERT-large / LLaMA-scale settings.
LIMITS = {
    "model.hidden": 1 << 16, "model.max_len": 1 << 16, "data.block_size": 1 << 16, "data.vocab_size": 1 << 22,
    "space.layers": 1 << 12, "space.candidates": 1 << 10, "train.batch_size": 1 << 20, "train.grad_accum": 1 << 16,
    "train.eval_batches": 1 << 20, "train.eval_random_children": 1 << 10, "data.dev_blocks": 1 << 26,
}


def _check_limits(cfg: Config) -> None:
    for key, limit in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        size = len(value) if isinstance(value, list) else value
        what = f"{key} has {size:,} entries" if isinstance(value, list) else f"{key}={size:,}"
        require(size <= limit, f"{what}, more than the limit {limit:,} (a typo?)")


def validate(cfg: Config) -> None:
    """Each field on its own and against the others; nothing here needs a registry."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _check_limits(cfg)
    require(m.hidden > 0, f"model.hidden must be positive, got {m.hidden}")
    require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    require(m.max_len >= d.block_size, f"model.max_len ({m.max_len}) must be >= data.block_size ({d.block_size})")
    require(m.layer_norm_eps > 0, f"model.layer_norm_eps must be positive, got {m.layer_norm_eps}")
    require(m.init_std > 0, f"model.init_std must be positive, got {m.init_std}")
    require(d.block_size >= 8, f"data.block_size must be >= 8, got {d.block_size}")
    require(0.0 < d.mlm_probability < 1.0, f"data.mlm_probability must be in (0, 1), got {d.mlm_probability}")
    require(d.vocab_size >= 100, f"data.vocab_size must be >= 100, got {d.vocab_size}")
    require(d.dev_blocks >= 1, f"data.dev_blocks must be >= 1, got {d.dev_blocks}")
    require(0 <= d.anchor_blocks < d.dev_blocks,
         f"data.anchor_blocks must be in [0, data.dev_blocks={d.dev_blocks}), got {d.anchor_blocks}")
    require(d.max_chars_per_file is None or d.max_chars_per_file > 0, "data.max_chars_per_file must be positive or null")
    require(len(d.corpus) > 0, "data.corpus is empty")
    require(d.tokenizer_sample_chars > 0, f"data.tokenizer_sample_chars must be positive, got {d.tokenizer_sample_chars}")
    require(d.copy_max_mb >= 0, f"data.copy_max_mb must be >= 0, got {d.copy_max_mb}")
    require(d.num_proc >= 1, f"data.num_proc must be >= 1, got {d.num_proc}")
    require(bool(d.text_column), "data.text_column must not be empty")
    require(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    require(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    require(t.grad_accum > 0, f"train.grad_accum must be positive, got {t.grad_accum}")
    require(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    require(0 <= t.warmup_steps <= t.steps, f"train.warmup_steps must be in [0, train.steps], got {t.warmup_steps}")
    require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    require(t.clip_norm >= 0, f"train.clip_norm must be >= 0 (0 disables), got {t.clip_norm}")
    require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got '{t.device}'")
    for k in ("log_every", "eval_every", "ckpt_every", "eval_batches"):
        require(getattr(t, k) > 0, f"train.{k} must be positive, got {getattr(t, k)}")
    require(t.eval_random_children >= 0, "train.eval_random_children must be >= 0")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
