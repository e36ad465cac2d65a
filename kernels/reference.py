"""Eager PyTorch references for every fused op.

This file is the single definition of "correct" and of the "eager baseline": the supernet's eager
backend calls these functions, the Triton kernels (GPU) and the C++ ops (CPU) must match them, and
tests/benchmarks import them. Shapes: B batch, T sequence length, H hidden size, h heads, dh = H/h.
Padding masks are ``token_mask`` [B, T], True (bool) or nonzero (integer) where there is a real token.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FFN inner activation: exact (erf) GELU of ``x + bias``. x [..., D], bias [D]."""
    return F.gelu(x + bias)


def add_dropout_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    dropout_p: float,
    training: bool,
    eps: float = 1e-12,
    keep_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Post-LN sub-layer tail: ``LayerNorm(residual + dropout(x))`` over the last dim H.

    ``keep_mask`` (bool, shape of x) fixes the dropout pattern; without it torch's RNG draws one.
    """
    if training and dropout_p > 0.0:
        if keep_mask is None:
            keep_mask = torch.rand_like(x, dtype=torch.float32) >= dropout_p
        x = x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    return F.layer_norm(residual + x, (x.shape[-1],), weight, bias, eps)


def dropout(x: torch.Tensor, p: float, training: bool, keep_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverted dropout ``x * keep / (1 - p)`` (the embeddings' dropout).

    ``keep_mask`` (bool, x's shape) fixes the pattern; without it this is ``F.dropout`` (torch's RNG,
    exactly what ``nn.Dropout`` runs). Eval mode or p == 0 returns x itself.
    """
    if not training or p == 0.0:
        return x
    if keep_mask is None:
        return F.dropout(x, p, training=True)
    return x * keep_mask.to(x.dtype) / (1.0 - p)


def dwconv_bias_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Depthwise convolution along the sequence + bias + GELU (separable-conv candidate, first half).

    x [B, T, H]; weight [H, k] with k odd; bias [H]; zero padding of k // 2 on both ends ("same").
    Pad positions are zeroed in the input so no information flows out of them:
    ``y[b, t, c] = gelu(bias[c] + sum_j weight[c, j] * (x * m)[b, t + j - k // 2, c])``.
    """
    if token_mask is not None:
        x = x * token_mask.unsqueeze(-1).to(torch.bool).to(x.dtype)
    k = weight.shape[-1]
    if x.shape[1] == 0:  # conv1d refuses an empty sequence; the result is empty as well
        return F.gelu(x + bias)
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=k // 2, groups=x.shape[-1])
    return F.gelu(y.transpose(1, 2))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Softmax attention with a key-padding mask. q, k, v [B, h, T, dh] -> [B, h, T, dh].

    Masked keys get exactly zero probability. A row whose keys are all padding outputs zeros
    (probabilities are multiplied by the mask after the softmax, which keeps gradients finite).
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if token_mask is None:
        return torch.matmul(scores.softmax(-1), v)
    key_mask = token_mask[:, None, None, :].to(torch.bool)
    scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1) * key_mask.to(scores.dtype)
    return torch.matmul(probs, v)


def check_alignment_shapes(child_hiddens: Sequence[torch.Tensor], anchor_hiddens: Sequence[torch.Tensor]) -> None:
    """Every backend's precondition: all child and anchor hiddens share one shape.

    Layers of different shapes would make "the mean over real tokens" ambiguous (one token count, or
    one per layer?), so every backend refuses them with this same error.
    """
    tensors = [*child_hiddens, *anchor_hiddens]
    for t in tensors[1:]:  # == on shapes, not hashing: also works on symbolic shapes while tracing
        if t.shape != tensors[0].shape:
            raise ValueError("alignment_loss: all hiddens must have the same shape, got "
                             f"{list(tensors[0].shape)} and {list(t.shape)}")


def alignment_loss(
    child_hiddens: Sequence[torch.Tensor],
    anchor_hiddens: Sequence[torch.Tensor],
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MAGIC-A alignment: ``sum_l mean((h_l - a_l)^2)``, the mean over real tokens and H.

    Each h_l, a_l is [B, T, H], all of one shape; anchors are treated as constants (detached); extra
    layers on either side are ignored (``zip``). The loss is fp32 (fp64 for fp64 hiddens). An empty
    batch, or a mask without real tokens, gives 0 (the mean over no elements is taken as 0, so that
    such a batch adds nothing rather than NaN). The mask is applied to per-token sums ([B, T]) rather
    than to [B, T, H] tensors: the same value, fewer full-size passes.
    """
    n = min(len(child_hiddens), len(anchor_hiddens))
    if n == 0:
        raise ValueError("alignment_loss needs at least one child and one anchor hidden state")
    child_hiddens, anchor_hiddens = list(child_hiddens)[:n], list(anchor_hiddens)[:n]
    check_alignment_shapes(child_hiddens, anchor_hiddens)
    acc = torch.float64 if any(h.dtype == torch.float64 for h in child_hiddens) else torch.float32
    total = child_hiddens[0].new_zeros((), dtype=acc)
    if token_mask is not None:
        m = token_mask.to(torch.bool).to(acc)
        count = (m.sum() * child_hiddens[0].shape[-1]).clamp_min(1.0)
    else:
        count = max(1, child_hiddens[0].numel())
    for h, a in zip(child_hiddens, anchor_hiddens):
        if token_mask is None:
            total = total + F.mse_loss(h.to(acc), a.detach().to(acc), reduction="sum") / count
        else:
            per_token = (h.to(acc) - a.detach().to(acc)).square().sum(-1)
            total = total + (per_token * m).sum() / count
    return total


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A candidate's projection ``x @ weight.T + bias``: x [..., K], weight [N, K], bias [N]."""
    return F.linear(x, weight, bias)


def qkv_attention(qkv: torch.Tensor, heads: int, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`attention` on a packed projection: qkv [B, T, 3H] = (q | k | v), each split into ``heads``
    heads of dh = H / heads; returns the heads' outputs concatenated, [B, T, H] (an mha candidate's
    context before its output projection)."""
    B, T, H3 = qkv.shape
    if H3 % 3 or (H3 // 3) % heads:
        raise ValueError(f"qkv_attention: last dim {H3} is not 3 x a multiple of {heads} heads")
    H = H3 // 3
    q, k, v = qkv.view(B, T, 3, heads, H // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, token_mask).transpose(1, 2).reshape(B, T, H)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The MLM loss: softmax cross-entropy of logits [M, V] against int64 class indices [M], mean over
    the M rows (the masked positions; no ignore index). The loss is computed in fp32 (fp64 for fp64
    logits), whatever the logits' dtype. No rows (a batch without a masked token) gives 0, not NaN,
    still connected to the logits (their gradient is then empty)."""
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets)
