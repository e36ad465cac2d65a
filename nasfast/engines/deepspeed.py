"""DeepSpeed ZeRO-1/2/3 engine for supernet training, with the plain engine's exact semantics.

The plain engine relies on torch's AdamW skipping parameters whose ``.grad`` is None: only the sampled
child's weights and optimizer state move. DeepSpeed 0.19.8 breaks that in several measured ways:
(a) ZeRO flattens each parameter group into one buffer, so unused parameters get *zero* gradients,
    not None, at every stage, and Adam keeps moving them (momentum, bias correction, weight decay);
(b) ZeRO-3 keeps reduced gradients in a flat partition buffer that is never zeroed, so a parameter
    unused in a step would get its previous gradient applied again;
(c) children that differ across ranks crash stages 1-3 (gloo size mismatch) or silently mix gradients;
(d) ``gradient_clipping`` defaults to 1.0; (e) a torch optimizer needs ``zero_allow_untested_optimizer``.

Design: one parameter group per (layer, candidate) (split into decay / no-decay), plus the shared
embeddings and head. DeepSpeed keeps one flat fp32 partition per group, and ``ChildAdamW`` steps only
the groups flagged active for this step's child, so the other groups' partitions and Adam state are
untouched bit for bit (fixes a and b: a stale or zero gradient in an inactive group is never read).
The child is a pure function of (seed, step) as in the plain trainer; ``check_same_child`` all-gathers
a hash of it and fails loudly if ranks disagree (c). Clipping always comes from ``train.clip_norm``
(d), and the config sets (e). ZeRO-3 marks each candidate module as a leaf (its parameters are
gathered together when the candidate runs, and a child's order of modules may change every step
without re-tracing), and registers the decoder weight tied to the token embedding as an external
parameter of the head.

Only the child costs work (``zero_child.py``): under ZeRO-1/2 the optimizer step computes the norm,
updates and all-gathers the child's groups only (DeepSpeed's own step would all-gather the whole
supernet after every step); under ZeRO-3 the child's parameters are gathered once per step and
kept until the optimizer step instead of being gathered again for the backward.

Checkpoints: ZeRO state is partitioned, so every rank writes its shard with DeepSpeed's
``save_checkpoint`` into ``checkpoints/deepspeed/step<N>/``; only then does rank 0 write the
run's checkpoint file (atomic rename), which names that tag. A run killed mid-save therefore still
points at the previous complete tag, and older tags are deleted once the new checkpoint names its tag.
Non-finite weights or optimizer state on any rank refuse the save, as in the plain engine.
"""
from __future__ import annotations

import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nasfast.config import Config
from nasfast.engines.ds_config import STAGES, ds_env_defaults, load_ds_config  # noqa: F401 (the engine's config API)
from nasfast.engines.zero_child import (
    child_zero12_step,
    fallback_cost,
    hold_gathered,
    internals_tested,
    supports_child_step,
)
from nasfast.errors import UserError, warn
from nasfast.files import writing
from nasfast.space.searchspace import Arch

DS_DIR = "checkpoints/deepspeed"


class ChildAdamW(torch.optim.AdamW):
    """AdamW that steps only the parameter groups whose ``active`` flag is set.

    Under ZeRO each group's parameters are one flat partition whose gradient is never None, so
    torch's "skip params without grad" cannot tell the child's candidates from the others; the
    ``active`` flag does. A non-finite gradient in any active group on any rank skips the whole step
    on every rank (``skip_nonfinite``), so one bad batch never writes NaN into the weights. ZeRO-1/2/3
    call ``step`` once per group; there the engine turns the check off because the step's global
    gradient norm (one all-reduce) already decides to skip, on every rank alike.
    """

    skip_nonfinite = True

    def step(self, closure=None):
        groups = self.param_groups
        active = [g for g in groups if g.get("active", True)]
        if self.skip_nonfinite and not self._finite(active):
            self.skipped = True
            return None
        self.skipped = False
        self.param_groups = active  # torch's AdamW iterates self.param_groups; state is keyed by tensor
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups

    @staticmethod
    def _finite(groups: list[dict]) -> bool:
        flags = [torch.isfinite(p.grad).all() for g in groups for p in g["params"] if p.grad is not None]
        ok = torch.stack(flags).all().float() if flags else torch.ones(())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank calls step(): a collective is safe here
        return bool(ok > 0)


class ChildLoss(torch.nn.Module):
    """What DeepSpeed wraps: the supernet plus the loss of one child (MLM, + MAGIC-A alignment)."""

    def __init__(self, supernet: torch.nn.Module, cfg: Config):
        super().__init__()
        self.supernet, self.cfg = supernet, cfg
        self.extras: dict = {}

    def forward(self, arch: Arch, batch: dict, layer_seed: int, anchor: Optional[Arch]) -> torch.Tensor:
        from nasfast.engines.base import child_loss

        loss, self.extras = child_loss(self.supernet, self.cfg, arch, batch, layer_seed, anchor)
        return loss


def candidate_param_groups(model, cfg: Config) -> list[dict]:
    """One group per (layer, candidate) and decay class, plus the shared embeddings/head groups.

    Each group carries ``key``: ``"shared"`` or ``"L.C"`` (layer L, candidate index C).
    """
    groups: list[dict] = []

    def add(params: list, key: str) -> None:
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "weight_decay": cfg.train.weight_decay if decay else 0.0, "key": key})

    add(list(model.embeddings.parameters()) + list(model.head.parameters()), "shared")
    for layer, candidates in enumerate(model.layers):
        for index, module in enumerate(candidates):
            add(list(module.parameters()), f"{layer}.{index}")
    return groups


def active_keys(arch: Arch) -> set[str]:
    return {"shared"} | {f"{layer}.{cand}" for layer, cand in enumerate(arch)}


def arch_hash(arch: Arch) -> int:
    return zlib.crc32(",".join(map(str, arch)).encode())


# --- the engine ------------------------------------------------------------------------------------
class DeepSpeedEngine:
    """The engine seam (``nasfast.engines.base``) implemented with ``deepspeed.initialize``."""

    def __init__(self, model: torch.nn.Module, cfg: Config, world, device: torch.device, ds_config: dict,
                 run_dir: Optional[Path] = None):
        import deepspeed

        from nasfast.space.candidates import CandidateModule
        from nasfast.training.optim import build_scheduler

        self.cfg, self.world, self.device, self.run_dir = cfg, world, device, run_dir
        _single_process_group(device)
        self.ds_config = ds_config
        self.stage = int(ds_config["zero_optimization"].get("stage", 0))
        if self.stage == 3:
            # a candidate reads its LayerNorm weights inside its own forward: gather the module whole
            # (every registered kind's module class that holds parameters, so a new kind needs no entry here)
            leaves = {type(m) for m in model.modules() if isinstance(m, CandidateModule) and next(m.parameters(), None) is not None}
            deepspeed.utils.set_z3_leaf_modules(model, sorted(leaves, key=lambda c: c.__qualname__))
        self.optimizer = ChildAdamW(candidate_param_groups(model, cfg), lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        # The forward runs through engine(...): DeepSpeed's forward prologue is part of its gradient
        # accumulation bookkeeping (ZeRO-3 counts micro-steps there; called around it, each micro-batch
        # would overwrite the previous one's gradients instead of adding to them).
        self.engine, _, _, _ = deepspeed.initialize(model=ChildLoss(model, cfg), optimizer=self.optimizer,
                                                    lr_scheduler=self.scheduler, config=ds_config,
                                                    dist_init_required=not dist.is_initialized())
        self.model = model
        if self.stage == 3:
            deepspeed.zero.register_external_parameter(self.model.head, self.model.embeddings.tokens.weight)
        self._active: list[int] = []  # indices of this step's child's groups
        # the child-only ZeRO work re-implements DeepSpeed internals: only on the releases it is tested with
        self._tested = internals_tested()
        if not self._tested and self.stage > 0 and world.is_main:
            warn(fallback_cost(deepspeed.__version__))
        self._child_step = self._tested and self.stage in (1, 2) and supports_child_step(self.engine.optimizer)
        if self._child_step:
            self.engine.optimizer.step = child_zero12_step(self.engine.optimizer, lambda: self._active)
        if self._child_step or self.stage == 3:
            # DeepSpeed calls the optimizer once per group; the global-norm check (one all-reduce in
            # child_zero12_step; ZeRO-3's own overflow check on an invalid norm) already skips bad steps
            self.optimizer.skip_nonfinite = False
        self._micro = 0
        self.check_every = int(os.environ.get("NASFAST_CHECK_CHILD_EVERY", "1"))  # an 8-byte all-gather: cheap
        self._steps = 0

    # --- numerics ------------------------------------------------------------------------------
    def forward_loss(self, arch: Arch, batch: dict, layer_seed: int, anchor: Optional[Arch]) -> tuple[torch.Tensor, dict]:

        if self._micro == 0 and self.check_every and self._steps % self.check_every == 0:
            check_same_child(arch, self.world)
        if self.stage == 3 and self._tested:  # gathered once per step: the backward reuses the forward's copy
            hold_gathered(self.model.child_parameters(arch))
        loss = self.engine(arch, batch, layer_seed, anchor)
        return loss, self.engine.module.extras

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is already divided by grad_accum (the loop does it for every engine)."""
        self._micro += 1
        self.engine.set_gradient_accumulation_boundary(self._micro == self.cfg.train.grad_accum)
        self.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, arch: Arch) -> float:
        keys = active_keys(arch)
        for group in self.optimizer.param_groups:
            group["active"] = group["key"] in keys
        self._active = [i for i, g in enumerate(self.optimizer.param_groups) if g["active"]]
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self.engine.set_gradient_accumulation_boundary(False)
        stale = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
        if stale is not None:  # ZeRO-3 never zeroes it: a later step would see this step's gradients again
            stale.zero_()
        self._micro, self._steps = 0, self._steps + 1
        norm = self.engine.get_global_grad_norm()
        if getattr(self.optimizer, "skipped", False) or getattr(self.engine.optimizer, "overflow", False):
            return math.nan
        return float(norm) if norm is not None else math.nan

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def describe(self) -> str:
        return f"deepspeed zero-{self.stage} x{self.world.size}"

    # --- state ---------------------------------------------------------------------------------
    def states(self) -> dict:
        return {}  # weights, optimizer and scheduler live in the DeepSpeed shards (save_shards)

    def after_load(self, cfg: Config) -> None:
        from nasfast.training.optim import retarget_schedule

        if cfg.train.lr != self.scheduler.base_lrs[0]:
            retarget_schedule(self.optimizer, self.scheduler, cfg.train.lr)

    def check_finite(self, step: int) -> None:
        """Refuse to save NaN/inf weights or optimizer state on any rank (the last good tag stays)."""
        from nasfast.training.checkpointer import NonFiniteState

        local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in self.model.parameters()]
        for state in self.optimizer.state.values():
            local += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        ok = torch.stack([torch.isfinite(t).all() for t in local]).all().float()
        if self.world.enabled:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok <= 0:
            raise NonFiniteState(f"non-finite weights or optimizer state after step {step} (DeepSpeed shards not written)")

    def save_shards(self, step: int) -> dict:
        """Every rank writes its shard; returns what the run's checkpoint file records."""
        self.check_finite(step)
        folder = self.run_dir / DS_DIR
        tag = f"step{step}"
        with writing(folder / tag):  # a full disk (torch.save hides its errno); after_save of the next good save
            self.engine.save_checkpoint(str(folder), tag=tag, client_state={}, save_latest=False)  # drops this tag
        return {"deepspeed": {"tag": tag, "stage": self.stage, "world_size": self.world.size}}

    def load_shards(self, meta: Optional[dict]) -> None:
        if not meta or "deepspeed" not in meta:
            raise UserError("this run's checkpoint was written by the plain engine; resume it without --deepspeed")
        info = meta["deepspeed"]
        if info["world_size"] != self.world.size or info["stage"] != self.stage:
            raise UserError(f"the checkpoint holds ZeRO-{info['stage']} shards of {info['world_size']} rank(s); "
                            f"this job is ZeRO-{self.stage} on {self.world.size} (resume with the same layout)")
        folder = self.run_dir / DS_DIR
        if not (folder / info["tag"]).is_dir():
            raise UserError(f"DeepSpeed shards {folder / info['tag']} are missing")
        path, _ = self.engine.load_checkpoint(str(folder), tag=info["tag"], load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"DeepSpeed could not load {folder / info['tag']}")

    def after_save(self, meta: dict) -> None:
        """Delete every tag but the one the run's checkpoint now names (rank 0)."""
        keep_tag = meta["deepspeed"]["tag"]
        folder = self.run_dir / DS_DIR
        if not self.world.is_main or not folder.is_dir():
            return
        for entry in folder.iterdir():
            if entry.name == keep_tag:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    # --- introspection for tests and benchmarks -----------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Full (gathered) copies of every parameter, on every rank."""
        import deepspeed

        params = dict(self.model.named_parameters())
        if self.stage == 3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            # mid-step the child's parameters are already gathered and held (zero_child.hold_gathered):
            # gathering them again would free them on exit, under the modules that still need them
            missing = [p for p in params.values() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
            with deepspeed.zero.GatheredParameters(missing):
                return {n: p.detach().clone() for n, p in params.items()}
        return {n: p.detach().clone() for n, p in params.items()}

    def partition_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the supernet: its parameters, fp32 master partitions, gradients and
        Adam state. Gradients follow each stage's layout: ZeRO-3's persistent flat partition buffer; ZeRO-2
        partitions them like the master weights; ZeRO-0/1 hold full-size gradients before reducing."""
        params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in self.model.parameters())
        zopt = self.engine.optimizer
        if self.stage == 3:  # fp32 training updates the weight partitions in place: no separate master copy then
            master = sum(f.numel() * f.element_size() for f, w in zip(zopt.fp32_partitioned_groups_flat, zopt.fp16_partitioned_groups_flat)
                         if f is not w)
        else:
            master = sum(p.numel() * p.element_size() for g in self.optimizer.param_groups for p in g["params"])
        state = sum(v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.ndim > 0)
        buffer = getattr(zopt, "grad_partitions_flat_buffer", None)
        grads = (buffer.numel() * buffer.element_size() if buffer is not None
                 else master if self.stage == 2 else params)
        return {"params": params, "master_params": master, "grads": grads, "optimizer_state": state}


def _single_process_group(device: torch.device) -> None:
    """A one-rank process group for a plain ``nasfast pretrain --deepspeed`` (no launcher): without one,
    DeepSpeed falls back to MPI discovery and fails on machines without mpi4py."""
    if dist.is_initialized() or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def check_same_child(arch: Arch, world) -> None:
    """Fail loudly if ranks were about to train different children (they would mix gradients)."""
    if not world.enabled:
        return
    mine = torch.tensor([arch_hash(arch)], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    if len({int(t) for t in every}) != 1:
        raise RuntimeError(f"ranks disagree on the child of this step (rank {world.rank} has {arch}); children must be "
                           "a pure function of (seed, step) — this is a bug, please report it")
