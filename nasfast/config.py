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


def opt(default: Any, help: str) -> Any:
    """A config field with its one help text, written once: ``docs/configuration.md`` and
    ``nasfast pretrain --help-config`` are generated from it (``config_reference``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Sizes shared by every candidate and the embeddings / MLM head."""

    hidden: int = opt(128, "hidden size H of every layer")
    max_len: int = opt(128, "position embeddings (the longest sequence a model or its export accepts); >= data.block_size")
    dropout: float = opt(0.1, "dropout of every sub-layer and the embeddings, in [0, 1)")
    layer_norm_eps: float = opt(1e-12, "LayerNorm epsilon")
    init_std: float = opt(0.02, "standard deviation of the normal weight initialisation")


@dataclass
class SpaceConfig:
    """The search space: every layer picks one of the candidates."""

    layers: int = opt(6, "layers L of the supernet")
    candidates: list = opt(["mha:2", "mha:4", "mha:8", "ffn:256", "ffn:512", "conv:3", "conv:5", "conv:7", "identity"],
                           "candidate operators of every layer: `mha:h` (h heads), `ffn:d`, `geglu:d` (gated FFN), "
                           "`conv:k` (odd k), `identity`; more kinds register in nasfast/space/candidates.py")


@dataclass
class DataConfig:
    """Text in, token blocks out."""

    corpus: list = opt(["default"], "`default` (the embedded corpus), or .txt[.gz], .jsonl[.gz], .parquet files, saved "
                                    "`datasets` folders and folders of them; several are read in order")
    max_chars_per_file: Optional[int] = opt(None, "cap on the text read per file (null: all)")
    vocab_size: int = opt(8192, "WordPiece vocabulary trained on the corpus (>= 100)")
    lowercase: bool = opt(True, "lowercase the text before tokenizing")
    block_size: int = opt(128, "tokens per training sequence (>= 8)")
    mlm_probability: float = opt(0.15, "share of tokens masked for masked-LM, in (0, 1)")
    dev_blocks: int = opt(256, "blocks held out for dev evaluation")
    anchor_blocks: int = opt(0, "the last dev blocks reserved for MAGIC-A's anchor selection; never used for "
                                "evaluation (estimates, ground truth, dev curves), so choosing the anchor does not "
                                "peek at the data the ranking is judged on")
    prepared: Optional[str] = opt(None, "a folder made by `nasfast prepare-data`, or a run's data/ (tokenizer/ + "
                                        "blocks.npz): train on exactly those tokens instead of tokenizing data.corpus "
                                        "(how an experiment pins its data across machines)")
    cache_dir: Optional[str] = opt(None, "tokenized-corpus cache (null: $NASFAST_CACHE or ~/.cache/nasfast)")
    text_column: str = opt("text", "the text field of .jsonl / .parquet / saved-dataset inputs")
    tokenizer: Optional[str] = opt(None, "an existing local Hugging Face tokenizer folder instead of training one "
                                         "(vocab_size and lowercase are then the tokenizer's own)")
    tokenizer_sample_chars: int = opt(100_000_000, "text the tokenizer is trained on, split evenly over the inputs")
    copy_max_mb: float = opt(64.0, "a run folder copies its tokens up to this size (MB); larger data are referenced "
                                   "by path and content hash (resume and evaluate refuse another hash)")
    num_proc: int = opt(1, "tokenizer processes when pretrain prepares the data itself")
    prefetch: bool = opt(True, "build step s+1's batches on a background thread while step s computes")


@dataclass
class TrainConfig:
    """The optimisation, logging, evaluation and checkpoint cadence of a run."""

    seed: int = opt(0, "seed of the weights, the children, the batches, the masking and dropout")
    steps: int = opt(300, "training steps (one child per step)")
    batch_size: int = opt(32, "sequences per micro-batch per rank")
    grad_accum: int = opt(1, "micro-batches per step")
    lr: float = opt(1e-3, "peak learning rate of AdamW")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and norms)")
    warmup_steps: int = opt(30, "linear warm-up steps, then linear decay; longer than the run: a tenth of the run, "
                                "with a notice (pretrain and ground-truth alike)")
    min_lr_ratio: float = opt(0.1, "the learning rate decays linearly to lr * min_lr_ratio at the last step")
    clip_norm: float = opt(1.0, "gradient-norm clipping (0 disables)")
    bf16: bool = opt(False, "bf16 autocast")
    device: str = opt("auto", "auto | cpu | cuda")
    log_every: int = opt(10, "steps between metrics.jsonl lines")
    eval_every: int = opt(100, "steps between dev evaluations of the reference children")
    eval_batches: int = opt(4, "dev batches per evaluation")
    eval_random_children: int = opt(3, "fixed random children evaluated besides the reference children")
    ckpt_every: int = opt(100, "steps between checkpoints")
    deepspeed: Optional[str] = opt(None, "a DeepSpeed JSON (ZeRO-1/2/3, e.g. configs/ds/zero2.json): train through "
                                         "DeepSpeed; null: the plain engine (docs/deepspeed.md)")


@dataclass
class SamplerConfig:
    """Which child trains at each step."""

    name: str = opt("spos", "spos (uniform child) | magic-t (each step changes k layers of the previous child) | "
                            "magic-a (uniform child + alignment to the anchor) | magic (both)")
    k: int = opt(1, "MAGIC-T: layers changed per step (1 is the paper's; k = layers forces every layer to change, "
                    "which is not SPOS)")
    walk: str = opt("uniform", "MAGIC-T: uniform | balanced (shuffled round-robin layers, least-visited candidate)")


@dataclass
class AlignConfig:
    """MAGIC-A's alignment loss; used by the samplers whose ``aligns`` is true (magic-a, magic)."""

    weight: float = opt(0.1, "λ of the alignment term λ · Σ_l mean((h_l(child) − h_l(anchor))²)")
    anchor_every: int = opt(20, "steps between anchor challenges (anchor and child re-scored together on the "
                                "current weights)")
    anchor_init: str = opt("best:8", "best:N (best of N random children with context) | random (a random child with context) | "
                                      "largest (the largest child with context) | an arch string (one without mha/conv warns)")
    anchor_warmup: Optional[int] = opt(None, "steps of plain MLM before the anchor is chosen and alignment starts "
                                             "(null: 10% of train.steps)")
    prefix_sharing: bool = opt(True, "compute the layers child and anchor share before their first difference once "
                                     "(exactly the naive loss and gradients)")
    anchor_precision: str = opt("fp32", "fp32 | bf16: bf16 runs the anchor's no-grad forward under bf16 autocast "
                                        "(a bf16-rounded target, cheaper where bf16 matmuls are fast); the child and "
                                        "the anchor challenge stay in the training precision")

    def warmup_steps(self, total_steps: int) -> int:
        return total_steps // 10 if self.anchor_warmup is None else self.anchor_warmup


@dataclass
class KernelsConfig:
    """Which implementation of the fused ops runs."""

    backend: str = opt("auto", "auto (Triton on CUDA, native C++ on CPU, else eager) | eager (PyTorch references) | "
                               "triton | native")


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
    require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")  # above train.steps: clipped (optim.warmup_steps)
    require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    require(t.clip_norm >= 0, f"train.clip_norm must be >= 0 (0 disables), got {t.clip_norm}")
    require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got '{t.device}'")
    for k in ("log_every", "eval_every", "ckpt_every", "eval_batches"):
        require(getattr(t, k) > 0, f"train.{k} must be positive, got {getattr(t, k)}")
    require(t.eval_random_children >= 0, "train.eval_random_children must be >= 0")


def config_keys() -> list[tuple[str, Any, str]]:
    """Every config key as (``section.key``, default, help), in the dataclasses' order."""
    out = []
    for section in dataclasses.fields(Config):
        defaults = section.default_factory()
        for f in dataclasses.fields(defaults):
            out.append((f"{section.name}.{f.name}", getattr(defaults, f.name), f.metadata.get("help", "")))
    return out


def _yaml_value(value: Any) -> str:
    """A default as one would write it in YAML or --set."""
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_reference() -> str:
    """The markdown reference of every key (the generated part of docs/configuration.md)."""
    lines = []
    for section in dataclasses.fields(Config):
        doc = (section.default_factory.__doc__ or "").strip().splitlines()[0]
        lines += [f"### `{section.name}`", "", doc, "", "| key | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{key.split('.', 1)[1]}` | `{_yaml_value(default)}` | {help.replace('|', '&#124;')} |"
                  for key, default, help in config_keys() if key.startswith(section.name + ".")]
        lines.append("")
    return "\n".join(lines)


def config_help_text() -> str:
    """The same texts for a terminal (``nasfast pretrain --help-config``)."""
    return "\n".join(f"{key} (default {_yaml_value(default)}): {help.replace('`', '')}" for key, default, help in config_keys())


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

