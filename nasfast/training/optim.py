"""Optimizer, learning-rate schedule and the clipped step, shared by the supernet trainer and the
standalone children of ground truth (so both follow exactly the same update rule)."""
from __future__ import annotations

import math
import os

import torch

from nasfast.config import Config, TrainConfig
from nasfast.errors import warn


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms. Params without a grad (other children's
    candidates) are skipped by torch's AdamW, so their weights and state stay bit-for-bit."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-6)
    if decay and decay[0].is_cuda:
        fused_adam = _apex_fused_adam()
        if fused_adam is not None:  # NVIDIA apex, when built on this machine; it also skips grad-less params
            return fused_adam(groups, adam_w_mode=True, **kwargs)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if decay and all(p.device.type == "cpu" and p.dtype in _CPU_FUSED_DTYPES for g in groups for p in g["params"]):
        # torch's CPU fused AdamW: one vectorised pass per tensor instead of several (the measured share
        # is in benchmarks/results/); it skips grad-less params exactly like the default.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


_CPU_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _apex_fused_adam():
    """apex.optimizers.FusedAdam if NVIDIA apex is importable, else None (never pip-install 'apex':
    that PyPI name is an unrelated web package)."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:
        return None
    return FusedAdam


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up over ``warmup`` steps, then linear decay to ``min_ratio`` at step ``total``."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 1.0 - (1.0 - min_ratio) * min(1.0, progress)

    return f


_warmup_noticed: set[tuple[int, int]] = set()


def warmup_steps(t: TrainConfig, steps: int | None = None, notice: bool = True) -> int:
    """The warm-up a run of ``steps`` (default ``train.steps``) uses: ``train.warmup_steps``, or, when
    that is longer than the whole run, a tenth of the run, said once in one line (when training starts:
    ``notice=False`` for bookkeeping such as ground truth's protocol key).

    One rule for the supernet trainer (every engine) and ground truth's standalone children, so
    ``--set train.steps=10`` or ``ground-truth --steps 10`` run with the default warm-up instead of
    being refused or spending the whole run warming up."""
    steps = t.steps if steps is None else steps
    if t.warmup_steps <= steps:
        return t.warmup_steps
    clipped = steps // 10
    if notice and (t.warmup_steps, steps) not in _warmup_noticed and os.environ.get("RANK", "0") == "0":
        _warmup_noticed.add((t.warmup_steps, steps))
        warn(f"train.warmup_steps={t.warmup_steps} is more than the {steps} training steps; "
             f"warming up for {clipped} steps (a tenth of the run)")
    return clipped


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (``warmup_steps``) then linear decay over ``steps`` (default ``train.steps``)."""
    t = cfg.train
    steps = t.steps if steps is None else steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps(t, steps), steps, t.min_lr_ratio))


def retarget_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """After loading a checkpoint: peak LR ``lr`` and this scheduler's lambda from the current step on.

    ``load_state_dict`` restores the saved peak LR and the LR the old schedule gave the next step; a
    resume that changes ``train.lr`` or ``train.steps`` must train with the new values, not log them.
    """
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(optimizer.param_groups, lrs):
        group["initial_lr"], group["lr"] = lr, value
    scheduler._last_lr = lrs


def grad_norm(params: list) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))


def clip_and_step(params: list, optimizer, scheduler, clip_norm: float, skip_nonfinite: bool = False) -> float:
    """Clip the gradient norm of ``params`` (0 disables), step optimizer and schedule; returns the norm.

    With ``skip_nonfinite`` a NaN/inf norm leaves weights, optimizer state and schedule untouched
    (the gradients are dropped): one bad batch must not write NaN into every weight it touched.
    """
    if clip_norm > 0:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # clip_grad_norm_ multiplies every gradient by min(1, clip / (norm + 1e-6)); skipping the
        # multiply by exactly 1.0 when nothing is clipped saves a full pass over the gradients.
        if not float(norm) + 1e-6 <= clip_norm:  # also on NaN/inf, as clip_grad_norm_ would
            torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm)
    else:
        norm = grad_norm(params)
    value = float(norm)
    if skip_nonfinite and not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        return value
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return value
