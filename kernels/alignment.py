"""MAGIC-A alignment loss over all layers in one pass that also produces its gradient.

``loss = sum_l mean over real tokens and H of (h_l - a_l)^2``. Each layer is read once: the kernel
writes per-program partial sums of the masked squared difference AND the gradient
``dL/dh_l = 2 (h_l - a_l) m / count``; backward is only ``grad_out * dL/dh_l``. Anchors are
constants (no gradient). ``count = max(1, sum(m) * H)`` stays on the device (no host sync).
Reference: ``nasfast.kernels.reference.alignment_loss``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from nasfast.kernels._common import NAMESPACE, acc_torch_dtype, acc_type, pow2, row_block, tile_budget
from nasfast.kernels.reference import check_alignment_shapes


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _alignment_kernel(
    HID,        # pointer, [N, H] child hidden state of one layer (N = B * T)
    ANC,        # pointer, [N, H] anchor hidden state of the same layer
    TM,         # pointer, [N] int8 token mask (1 = real token); read only when HAS_MASK
    INV,        # pointer, [1] ACC, 1 / count
    PART,       # pointer, [programs] ACC output: partial sums of m * (h - a)^2
    GRAD,       # pointer, [N, H] output: 2 (h - a) m / count (written only when WRITE_GRAD)
    N,          # int, rows
    H,          # int, hidden size
    stride_h,   # int, row stride of HID (last dim contiguous)
    stride_a,   # int, row stride of ANC
    stride_g,   # int, row stride of GRAD
    ACC: tl.constexpr,         # accumulation dtype
    HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,  # False under no_grad / when no child needs a gradient
    BLOCK_M: tl.constexpr,     # rows per program
    BLOCK_H: tl.constexpr,     # next power of two >= H
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < N
    mask = rmask[:, None] & (cols[None, :] < H)
    if HAS_MASK:
        mask = mask & (tl.load(TM + rows, mask=rmask, other=0) != 0)[:, None]
    rows64 = rows.to(tl.int64)
    h = tl.load(HID + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(ACC)
    a = tl.load(ANC + rows64[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(ACC)
    diff = h - a  # zero outside mask
    tl.store(PART + pid, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if WRITE_GRAD:
        inv = tl.load(INV)
        tl.store(GRAD + rows64[:, None] * stride_g + cols[None, :], 2.0 * inv * diff,
                 mask=rmask[:, None] & (cols[None, :] < H))


# --------------------------------------------------------------------------------------- launchers
def _rows(t: torch.Tensor, h: int) -> torch.Tensor:
    t = t.reshape(-1, h)
    return t if t.stride(-1) == 1 else t.contiguous()


def alignment_forward(child: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor],
                      token_mask: Optional[torch.Tensor], need_grad: bool):
    """Returns (loss, [dloss/dchild_l] or [])."""
    if len(child) != len(anchor) or not child:
        raise ValueError("alignment_loss needs as many anchor as child hidden states (at least one)")
    check_alignment_shapes(child, anchor)  # one count for all layers is right only for one shape
    h = child[0].shape[-1]
    device = child[0].device
    acc_t = acc_torch_dtype(*child, *anchor)
    acc = acc_type(*child, *anchor)
    if token_mask is not None:
        tm = token_mask.reshape(-1).to(torch.bool).contiguous()
        count = tm.sum(dtype=acc_t) * h
        tm = tm.view(torch.int8)
    else:
        tm = None
        count = torch.full((), child[0].numel(), dtype=acc_t, device=device)  # all layers share the shape
    inv = (1.0 / count.clamp_min(1.0)).reshape(1)
    grads: List[torch.Tensor] = []
    parts = []
    block_h = pow2(h)
    for hid, anc in zip(child, anchor):
        h2, a2 = _rows(hid, h), _rows(anc.detach(), h)
        n = h2.shape[0]
        block_m = row_block(n, block_h, tile_budget())
        programs = triton.cdiv(max(n, 1), block_m)
        part = torch.empty(programs, dtype=acc_t, device=device)
        grad = torch.empty((n, h), dtype=hid.dtype, device=device) if need_grad else h2
        _alignment_kernel[(programs,)](
            h2, a2, tm if tm is not None else h2, inv, part, grad, n, h, h2.stride(0), a2.stride(0), grad.stride(0),
            ACC=acc, HAS_MASK=tm is not None, WRITE_GRAD=need_grad, BLOCK_M=block_m, BLOCK_H=block_h,
            num_warps=4 if block_h <= 1024 else 8,
        )
        parts.append(part)
        if need_grad:
            grads.append(grad.reshape(hid.shape))
    loss = (torch.cat(parts).sum() * inv[0]) if len(parts) > 1 else parts[0].sum() * inv[0]
    return loss, grads


# ----------------------------------------------------------------------- custom ops and autograd
@torch.library.custom_op(f"{NAMESPACE}::alignment_loss_fwd", mutates_args=())
def _fwd_op(child: List[torch.Tensor], anchor: List[torch.Tensor], token_mask: Optional[torch.Tensor],
            need_grad: bool) -> tuple[torch.Tensor, List[torch.Tensor]]:
    return alignment_forward(child, anchor, token_mask, need_grad)


@_fwd_op.register_fake
def _(child, anchor, token_mask, need_grad):
    check_alignment_shapes(child, anchor)
    loss = child[0].new_empty((), dtype=acc_torch_dtype(*child, *anchor))
    return loss, [c.new_empty(c.shape) for c in child] if need_grad else []


def _setup_context(ctx, inputs, output):
    child, anchor, token_mask, need_grad = inputs
    loss, grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.n_layers = len(child)
    ctx.save_for_backward(*grads)


def _backward(ctx, grad_out, grad_grads):
    grads = ctx.saved_tensors
    child_grads = [g * grad_out.to(g.dtype) for g in grads] if grads else [None] * ctx.n_layers
    return child_grads, [None] * ctx.n_layers, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def alignment_loss(
    child_hiddens: Sequence[torch.Tensor],
    anchor_hiddens: Sequence[torch.Tensor],
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same signature and semantics as ``reference.alignment_loss`` (anchors get no gradient)."""
    child = list(child_hiddens)
    anchor = [a.detach() for a in anchor_hiddens][: len(child)]
    child = child[: len(anchor)]  # zip() semantics of the reference
    check_alignment_shapes(child, anchor)  # before the custom op, so the error is the reference's
    need_grad = torch.is_grad_enabled() and any(c.requires_grad for c in child)
    return _fwd_op(child, anchor, token_mask, need_grad)[0]
