"""Memory of one training step, estimated before anything is allocated, and the check that refuses a
step that cannot fit (one line, exit 2) instead of letting the kernel's OOM killer end the process.

The estimate is what the engine holds at the peak of a step, the start of backward:

- weights of the whole supernet (the engine holds all of it) and AdamW's two fp32 moments of every
  parameter (over a run every candidate is trained, so every parameter gets optimizer state);
- gradients of the largest child (gradients are set to None after each step);
- activations autograd keeps for one micro-batch of that child: embeddings, each layer's candidate,
  the MLM head and the loss at the masked positions (mlm_probability of the tokens), plus the
  gradient of the [M, vocab] logits that backward creates first;
- for MAGIC-A (the sampler aligns), the anchor's no-grad forward: its L hidden states, the targets.

Per-token byte counts are the growth of peak RSS per layer of real fp32 steps (eager backend, glibc
heap kept by ``nasfast.allocator``), which is 1.4-2.5x what autograd saves (forward and backward
temporaries do not reuse each other's heap blocks); tests/test_resource_bounds.py checks the whole
estimate against the measured peak of small real steps. The eager attention keeps [B, heads, T, T] scores and probabilities;
the fused backends (native, triton) are flash-style and keep one statistic per row instead.
Close rather than conservative: a user who has the memory is never refused.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from nasfast.config import Config
from nasfast.errors import UserError
from nasfast.resources import available_memory, gib
from nasfast.space.candidates import (
    Candidate,
    FeedForward,
    GatedFeedForward,
    Identity,
    MultiHeadAttention,
    SeparableConv,
)
from nasfast.space.searchspace import SearchSpace
from nasfast.space.supernet import child_num_params

FP32 = 4
ADAM_STATES = 2  # exp_avg, exp_avg_sq
STEP_OVERHEAD = 32 << 20  # first-step allocations of autograd and the math libraries (measured: ~30 MiB)
BF16_ACTIVATION_SHARE = 0.6  # under bf16 autocast matmul outputs are bf16, LayerNorm/softmax stay fp32


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step, by part."""

    weights: int
    optimizer: int
    gradients: int
    activations: int
    anchor: int
    overhead: int = STEP_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations + self.anchor + self.overhead


def candidate_activation_bytes(cand: Candidate, hidden: int, seq_len: int, fused_attention: bool) -> int:
    """Bytes one token keeps for backward through this candidate's sub-layer (fp32).

    A registered kind may define ``activation_bytes(hidden, seq_len)``; kinds that do not are counted
    like an attention sub-layer without scores (26 H: a post-LN sub-layer's projections, mask, norm)."""
    H, T = hidden, seq_len
    own = getattr(cand, "activation_bytes", None)
    if callable(own):
        return int(own(H, T))
    if isinstance(cand, Identity):
        return 0
    if isinstance(cand, MultiHeadAttention):  # projections, mask, norm; eager: [T, T] scores, probs, masks
        return 26 * H + (4 * cand.heads if fused_attention else 25 * cand.heads * T)
    if isinstance(cand, FeedForward):  # fc1 output, GELU output and their reuse (12 d), the tail (12 H)
        return 12 * H + 12 * cand.inner
    if isinstance(cand, GatedFeedForward):  # gate, GELU, up, product
        return 12 * H + 30 * cand.inner
    if isinstance(cand, SeparableConv):
        return 43 * H
    return 26 * H


def step_memory(cfg: Config, space: SearchSpace, vocab_size: int, fused_attention: bool, aligns: bool,
                arch: Optional[Sequence[int]] = None) -> StepMemory:
    """The step's memory (see the module docstring) for micro-batches of ``train.batch_size`` sequences:
    of the supernet training its worst child, or (``arch``) of that child trained as a static model."""
    H, T, B, L = space.hidden, cfg.data.block_size, cfg.train.batch_size, space.num_layers
    tokens = B * T
    masked = cfg.data.mlm_probability * tokens
    shared = child_num_params(space, (), vocab_size, cfg.model.max_len)  # embeddings + head
    per_layer = [c.num_params(H) for c in space.candidates]
    act = [candidate_activation_bytes(c, H, T, fused_attention) * tokens for c in space.candidates]
    if arch is None:  # per layer the candidate keeping the most (activations + gradients): O(candidates)
        worst = max(range(len(act)), key=lambda i: act[i] + FP32 * per_layer[i])
        counts = {worst: L}
        held = shared + L * sum(per_layer)
    else:
        counts = collections.Counter(arch)
        held = shared + sum(n * per_layer[c] for c, n in counts.items())
    child = shared + sum(n * per_layer[c] for c, n in counts.items())
    layers = sum(n * act[c] for c, n in counts.items())
    embed = (9 * H + 24) * tokens  # sum, norm, dropout mask, ids, labels
    head = masked * (9 * H + 20 * vocab_size)  # dense, GELU, norm; logits, softmax and their gradients
    activations = (layers + embed + head) * (BF16_ACTIVATION_SHARE if cfg.train.bf16 else 1.0)
    anchor = FP32 * L * tokens * H if aligns else 0  # the anchor's hidden states (alignment targets)
    return StepMemory(weights=FP32 * held, optimizer=ADAM_STATES * FP32 * held, gradients=FP32 * child,
                      activations=int(activations), anchor=int(anchor))


def fused_attention(backend: str, device: torch.device) -> bool:
    """Whether ``kernels.backend`` on ``device`` runs a flash-style attention (no [T, T] scores kept);
    decided from the names alone, without building (or compiling) the backend."""
    from nasfast.kernels.registry import AUTO, AUTO_PREFERENCE

    if backend == AUTO:
        backend = AUTO_PREFERENCE.get(torch.device(device).type, "eager")
    return backend != "eager"


def check_step_fits(cfg: Config, space: SearchSpace, vocab_size: int, device: torch.device, what: str,
                    aligns: bool = False, arch: Optional[Sequence[int]] = None) -> StepMemory:
    """``step_memory`` of this config, refused with one line when it cannot fit on ``device``."""
    need = step_memory(cfg, space, vocab_size, fused_attention(cfg.kernels.backend, device), aligns, arch)
    check_fits(need, device, what, "lower train.batch_size (raise train.grad_accum to keep the batch), "
                                   "data.block_size or the model's sizes")
    return need


def check_fits(need: StepMemory, device: torch.device, what: str, advice: str,
               available: Optional[int] = None) -> None:
    """Refuse (UserError, one line) when ``need`` exceeds the memory ``device`` has available now."""
    free = available_memory(device) if available is None else available
    if free is None or need.total <= free:
        return
    where = "GPU memory free" if torch.device(device).type == "cuda" else "memory available"
    raise UserError(f"{what} needs about {gib(need.total)} (weights+optimizer {gib(need.weights + need.optimizer)}, "
                    f"activations {gib(need.activations + need.anchor)}) but the machine has {gib(free)} {where}; "
                    f"{advice}")
