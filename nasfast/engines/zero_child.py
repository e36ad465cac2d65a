"""ZeRO work limited to the step's child: what DeepSpeed 0.19.8 would otherwise do for the whole supernet.

A supernet step trains one child, a small fraction of the parameters, but DeepSpeed's ZeRO
optimizers treat every parameter group alike:

* ZeRO-1/2 ``step()`` builds a flat gradient partition for every group, runs the optimizer once per
  group (one all-reduce per group for the norm), and then all-gathers *every* group's bit16
  partition, so each rank receives the whole supernet after every step although only the child's
  weights changed. ``child_zero12_step`` replaces that step: one all-reduce for the global gradient
  norm over the child's groups, the optimizer on those groups only, and an all-gather of those
  groups only. Groups outside the child keep their fp32 partition, optimizer state and bit16 copy
  bit for bit (their gradient partition is dropped unread), which is what the plain engine's
  ``AdamW`` does by skipping parameters without a gradient.
* ZeRO-3 gathers a leaf module's parameters before its forward, frees them after it, and gathers
  them again for its backward: the child's weights cross the wire twice per micro-batch.
  ``hold_gathered`` keeps the child's parameters gathered from the first forward to the optimizer
  step (which re-partitions everything), so they are gathered once per step.

Both rely on every rank training the same child (the engine asserts it): all collectives here are
then called by every rank on the same groups in the same order.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Optional

import torch

HOLD = -7  # a sentinel "active submodule" id: DeepSpeed releases a parameter only when it has none


# The DeepSpeed releases whose internals ``child_zero12_step`` and ``hold_gathered`` mirror and are tested
# against (tests/test_deepspeed.py); on any other release the engine runs DeepSpeed's own step.
TESTED_DEEPSPEED = ("0.19.8",)


def internals_tested(version: Optional[str] = None) -> bool:
    """Whether this DeepSpeed (``version``, default the installed one) is one the child-only step is tested
    with. ``NASFAST_ZERO_CHILD_STEP=0`` forces DeepSpeed's own step (how the tests run that path)."""
    if os.environ.get("NASFAST_ZERO_CHILD_STEP") == "0":
        return False
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    return version in TESTED_DEEPSPEED


def fallback_cost(version: str) -> str:
    """The one warning line when the child-only step is off: why, and what it costs (the results are the same)."""
    why = ("NASFAST_ZERO_CHILD_STEP=0" if os.environ.get("NASFAST_ZERO_CHILD_STEP") == "0" else
           f"DeepSpeed {version} is not a release nasfast's child-only ZeRO step is tested with ({', '.join(TESTED_DEEPSPEED)})")
    return (f"{why}; using DeepSpeed's own step: the same updates, but every "
            f"candidate's partition is all-gathered after each step (ZeRO-1/2) and the child is gathered again "
            f"for every backward (ZeRO-3)")


def supports_child_step(zopt) -> bool:
    """Whether ``zopt`` (a ZeRO-1/2 optimizer) takes the plain path ``child_zero12_step`` re-implements."""
    plain = not (getattr(zopt, "cpu_offload", False) or getattr(zopt, "zenflow", False)
                 or getattr(zopt, "torch_autocast_gradscaler", None) is not None or getattr(zopt, "has_moe_layers", False))
    muon = hasattr(zopt, "_muon_update_lacks_loss_scale") and any(
        zopt._muon_update_lacks_loss_scale(i) for i in range(len(zopt.bit16_groups)))
    return plain and not muon


def child_zero12_step(zopt, active: Callable[[], list[int]]) -> Callable[[], None]:
    """A ``step`` for DeepSpeed's ZeRO-1/2 optimizer ``zopt`` that touches only the groups ``active()`` names.

    Mirrors ``DeepSpeedZeroOptimizer.step`` (0.19.8) without CPU offload: global L2 norm, skip on a
    non-finite norm (``zopt.overflow`` then tells the DeepSpeed engine not to step the LR schedule,
    as the plain engine does), clip, AdamW per group, copy fp32 -> bit16, all-gather.
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import all_gather_dp_groups
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID
    from deepspeed.runtime.zero.utils import get_norm_dtype

    def step(closure=None):
        zopt.micro_step_id = INITIAL_MICRO_STEP_ID
        groups = active()
        chosen = set(groups)
        # one all-reduce for the norm of the child's gradients (each rank holds disjoint partition slices)
        squares = [torch.linalg.vector_norm(g.to(get_norm_dtype())).float().square() for i in groups
                   for g in zopt.averaged_gradients[i] if g is not None and not getattr(g, "_zero_padding", False)]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=zopt.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=zopt.dp_process_group)
        norm = total.sqrt()
        zopt.overflow = not math.isfinite(float(norm))
        prev_scale = zopt.loss_scale
        zopt._update_scale(zopt.overflow)
        for i in range(len(zopt.bit16_groups)):  # gradients outside the child are dropped unread
            if i not in chosen or zopt.overflow:
                zopt.free_grad_in_param_list(zopt.params_in_partition[i])
                zopt.free_grad_in_param_list(zopt.params_not_in_partition[i])
                zopt._release_preflattened_grad_buffers(i)
                zopt.averaged_gradients[i] = None
                zopt.all_grad_tensors[i] = None
        if zopt.overflow:
            zopt._global_grad_norm = float("inf")
            zopt.zero_grad(set_to_none=True)
            return
        zopt._global_grad_norm = norm / prev_scale
        for i in groups:
            partition_id = dist.get_rank(group=zopt.real_dp_process_group[i])
            zopt.free_grad_in_param_list(zopt.params_not_in_partition[i])
            flat = zopt._get_preflattened_grad_partition(i)
            if flat is None:
                if partition_id == dist.get_world_size(group=zopt.real_dp_process_group[i]) - 1:
                    flat = zopt.flatten_dense_tensors_aligned(zopt.averaged_gradients[i], int(zopt.partition_size[i]))
                else:
                    flat = zopt.flatten(zopt.averaged_gradients[i])
            fp32 = zopt.single_partition_of_fp32_groups[i]
            grad = flat.to(fp32.dtype)
            assert grad.numel() == zopt.partition_size[i], "gradient partition size mismatch"
            fp32.grad = grad
            zopt.free_grad_in_param_list(zopt.params_in_partition[i])
            zopt._release_preflattened_grad_buffers(i)
            zopt.averaged_gradients[i] = None
            zopt.all_grad_tensors[i] = None
            zopt.unscale_and_clip_grads([grad], norm)
            zopt._optimizer_step(i)
            fp32.grad = None
            zopt.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(fp32.data)
        if groups:
            all_gather_dp_groups(groups_flat=[zopt.bit16_groups_flat[i] for i in groups],
                                 partitioned_param_groups=[zopt.parallel_partitioned_bit16_groups[i] for i in groups],
                                 dp_process_group=[zopt.real_dp_process_group[i] for i in groups],
                                 start_alignment_factor=zopt.nccl_start_alignment_factor,
                                 allgather_bucket_size=zopt.allgather_bucket_size)
        for i in groups:
            zopt._update_model_bit16_weights(i)

    return step


def hold_gathered(params: Iterable[torch.nn.Parameter]) -> None:
    """Keep ZeRO-3 ``params`` gathered until the next ``release_and_reset_all`` (the optimizer step).

    DeepSpeed frees a gathered parameter when its set of active submodules becomes empty after a
    module's forward or backward; a sentinel entry keeps it non-empty, so the backward (and later
    micro-batches of the step) reuse the forward's copy. ``step()`` clears every parameter's set and
    re-partitions them all, so nothing stays held past the step.
    """
    for p in params:
        if hasattr(p, "ds_active_sub_modules"):
            p.ds_active_sub_modules.add(HOLD)
