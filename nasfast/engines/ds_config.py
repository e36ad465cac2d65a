"""DeepSpeed JSON configs for the supernet engine: read, type-checked like nasfast's own config values,
and reconciled with the run config (batch sizes, clipping and bf16 come from it); and the environment
DeepSpeed needs on a CPU machine. Imports no DeepSpeed at module level, so a bad config fails fast."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from nasfast.config import Config
from nasfast.errors import UserError

STAGES = (0, 1, 2, 3)


def load_ds_config(path: str, cfg: Config, world_size: int) -> dict:
    """Read and check a DeepSpeed JSON against the run config; returns the resolved dict.

    Batch keys may be "auto" (filled from ``train``); given values must agree with
    ``train.batch_size`` x ``train.grad_accum`` x world size. Every problem is one ``UserError`` line,
    raised before any process group or tokenizer work.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("--deepspeed needs the deepspeed package: pip install 'nasfast[deepspeed]' "
                        "(DS_BUILD_OPS=0 installs it in seconds; compiled ops are built on first use)") from None
    file = Path(path)
    if not file.is_file():
        raise UserError(f"DeepSpeed config not found: {file}")
    try:
        ds = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"DeepSpeed config {file} is not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config {file} must be a JSON object")
    check_ds_values(ds, file)
    t = cfg.train
    ds.setdefault("zero_optimization", {})  # the section later code reads the stage from
    want = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * world_size}
    for key, value in want.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given != value:
            raise UserError(f"DeepSpeed config {file}: {key}={given} does not match train.batch_size={t.batch_size} x "
                            f"train.grad_accum={t.grad_accum} x {world_size} rank(s) (= {value}); set it to {value} or \"auto\"")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(f"DeepSpeed config {file}: remove '{key}': nasfast builds AdamW with one group per candidate "
                            "and its LR schedule from the train section")
    if ds.get("fp16", {}).get("enabled"):
        raise UserError(f"DeepSpeed config {file}: fp16 is not supported; use bf16 (train.bf16 or \"bf16\": {{\"enabled\": true}})")
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if bf16 == "auto":
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.bf16}
    elif bf16 != t.bf16:
        raise UserError(f"DeepSpeed config {file}: bf16.enabled={str(bf16).lower()} but train.bf16={str(t.bf16).lower()}; "
                        f"make them agree (--set train.bf16={str(bf16).lower()})")
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != t.clip_norm:
        raise UserError(f"DeepSpeed config {file}: gradient_clipping={clip} but train.clip_norm={t.clip_norm}; "
                        "set train.clip_norm (or \"auto\")")
    ds["gradient_clipping"] = t.clip_norm  # DeepSpeed's own default would be 1.0
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**12)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# Top-level keys nasfast reads or DeepSpeed parses without a type check (get_scalar_param): checked here.
# (kind, keyword arguments of the nasfast.filevalues check)
_DS_TOP = {
    "train_micro_batch_size_per_gpu": ("integer", {"lo": 1, "auto": True}),
    "gradient_accumulation_steps": ("integer", {"lo": 1, "auto": True}),
    "train_batch_size": ("integer", {"lo": 1, "auto": True}),
    "gradient_clipping": ("number", {"lo": 0, "auto": True}),
    "steps_per_print": ("integer", {"lo": 1}),
    "wall_clock_breakdown": ("boolean", {}),
    "memory_breakdown": ("boolean", {}),
    "dump_state": ("boolean", {}),
    "prescale_gradients": ("boolean", {}),
    "gradient_predivide_factor": ("number", {"lo": 0}),
    "zero_allow_untested_optimizer": ("boolean", {}),
    "zero_force_ds_cpu_optimizer": ("boolean", {}),
    "sparse_gradients": ("boolean", {}),
}


def check_ds_values(ds: dict, file: Path) -> None:
    """Every value of a DeepSpeed JSON that nasfast reads or DeepSpeed would choke on (or silently
    coerce: its pydantic models read "yes" as true and true as stage 1), checked like a config value:
    one UserError line naming the file and the field."""
    from nasfast import filevalues as fv

    for key, (kind, kw) in _DS_TOP.items():
        if key in ds:
            getattr(fv, kind)(file, key, ds[key], **kw)
    zero = fv.mapping(file, "zero_optimization", ds.get("zero_optimization", {}))
    if "stage" in zero:
        fv.integer(file, "zero_optimization.stage", zero["stage"], lo=STAGES[0], hi=STAGES[-1])
    for name in ("bf16", "fp16"):
        section = fv.mapping(file, name, ds.get(name, {}))
        if "enabled" in section:
            fv.boolean(file, f"{name}.enabled", section["enabled"], auto=name == "bf16")  # "auto": from train.bf16
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for name, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config), ("fp16", DeepSpeedFP16Config)):
        if isinstance(ds.get(name), dict):
            section = {k: v for k, v in ds[name].items() if not (k == "enabled" and v == "auto")}
            _check_model_values(file, name, section, model)


def _check_model_values(file: Path, prefix: str, values: dict, model: Any) -> None:
    """``values`` against one of DeepSpeed's pydantic config models: bool / int fields strictly (its models
    coerce), then the model itself (unknown keys, enums, bounds); its first complaint becomes the one line."""
    import typing

    import pydantic

    from nasfast import filevalues as fv

    fields = {f.alias or n: f for n, f in model.model_fields.items()} | dict(model.model_fields)
    for key, value in values.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        kind = kinds[0]
        name = f"{prefix}.{key}"
        if kind is bool:
            fv.boolean(file, name, value)
        elif kind is int:
            fv.integer(file, name, value, lo=0, integral_float=True)  # sizes and counts; DeepSpeed takes 5e8
        elif isinstance(kind, type) and issubclass(kind, pydantic.BaseModel) and isinstance(value, dict):
            _check_model_values(file, name, value, kind)
    try:
        model(**values)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join([prefix, *map(str, err["loc"])])
        if err["type"] == "extra_forbidden":
            raise UserError(f"{file}: {where} is not a DeepSpeed setting (DeepSpeed "
                            f"{getattr(__import__('deepspeed'), '__version__', '?')})") from None
        raise UserError(f"{file}: {where}: {err['msg'].lower()}, got {fv.shown(err.get('input'))}") from None
    except (TypeError, ValueError) as exc:  # a model's own validator that is not pydantic's
        raise UserError(f"{file}: {prefix}: {str(exc).splitlines()[0][:120]}") from None


# --- optimizer -------------------------------------------------------------------------------------


def ds_env_defaults() -> None:
    """DeepSpeed on a machine without CUDA: the CPU accelerator (gloo), before deepspeed is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
