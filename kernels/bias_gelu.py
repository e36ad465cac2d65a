"""Fused bias + exact GELU (FFN inner activation), forward and backward.

Forward: ``y = gelu(x + bias)`` in one pass. Backward recomputes ``x + bias`` from the saved input
(no pre-activation tensor is stored) and produces ``dx`` and the ``dbias`` column reduction in the
same pass. Reference: ``nasfast.kernels.reference.bias_gelu``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nasfast.kernels._common import (
    NAMESPACE,
    acc_type,
    gelu,
    gelu_grad,
    interpreting,
    num_programs_target,
    pow2,
    row_block,
    tile_budget,
)


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _bias_gelu_fwd_kernel(
    X,            # pointer, [N, D] input (rows = all leading dims flattened), any float dtype
    BIAS,         # pointer, [D] bias
    Y,            # pointer, [N, D] output
    N,            # int, number of rows
    D,            # int, row width
    stride_x,     # int, row stride of X (elements); last dim contiguous
    stride_y,     # int, row stride of Y
    ACC: tl.constexpr,      # compute dtype (tl.float32, or tl.float64 for fp64 inputs)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # columns per tile (power of two)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    b = tl.load(BIAS + cols, mask=cols < D, other=0.0).to(ACC)
    y = gelu(x + b[None, :])
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,           # pointer, [N, D] upstream gradient
    X,            # pointer, [N, D] saved forward input
    BIAS,         # pointer, [D] bias
    DX,           # pointer, [N, D] output: gradient w.r.t. x
    DB_PART,      # pointer, [num_row_chunks, D] fp32/fp64 output: per-chunk partial sums of dx
    N,            # int, number of rows
    D,            # int, row width
    stride_dy,    # int, row stride of DY
    stride_x,     # int, row stride of X
    stride_dx,    # int, row stride of DX
    rows_per_chunk,  # int, rows handled by one program (multiple of BLOCK_M)
    ACC: tl.constexpr,      # compute dtype
    BLOCK_M: tl.constexpr,  # rows per loop iteration
    BLOCK_D: tl.constexpr,  # columns per program (power of two)
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(ACC)
    db = tl.zeros([BLOCK_D], dtype=ACC)
    start = chunk * rows_per_chunk
    for r in range(0, rows_per_chunk, BLOCK_M):
        rows = start + r + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < N) & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        dx = dy * gelu_grad(x + b[None, :])
        dx = tl.where(mask, dx, 0.0)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx, mask=mask)
        db += tl.sum(dx, axis=0)
    tl.store(DB_PART + chunk * D + cols, db, mask=cmask)


# --------------------------------------------------------------------------------------- launchers
def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    x2 = _rows(x, d)
    n = x2.shape[0]
    y = torch.empty((n, d), dtype=torch.result_type(x, bias), device=x.device)
    if n == 0:
        return y.reshape(x.shape)
    block_d = min(pow2(d), 4096 if interpreting() else 512)
    block_m = row_block(n, block_d, tile_budget())
    grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
    _bias_gelu_fwd_kernel[grid](
        x2, bias.contiguous(), y, n, d, x2.stride(0), y.stride(0),
        ACC=acc_type(x, bias), BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return y.reshape(x.shape)


def bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor):
    d = x.shape[-1]
    x2, dy2 = _rows(x, d), _rows(dy, d)
    n = x2.shape[0]
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
    acc = acc_type(x, bias, dy)
    block_d = min(pow2(d), 4096 if interpreting() else 256)
    block_m = row_block(n, block_d, tile_budget())
    col_blocks = triton.cdiv(d, block_d)
    chunks = max(1, min(triton.cdiv(max(n, 1), block_m), num_programs_target(x.device) // col_blocks))
    rows_per_chunk = triton.cdiv(triton.cdiv(max(n, 1), chunks), block_m) * block_m
    chunks = triton.cdiv(max(n, 1), rows_per_chunk)
    part = torch.empty((chunks, d), dtype=torch.float64 if acc == tl.float64 else torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[(chunks, col_blocks)](
        dy2, x2, bias.contiguous(), dx, part, n, d, dy2.stride(0), x2.stride(0), dx.stride(0), rows_per_chunk,
        ACC=acc, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return dx.reshape(x.shape), part.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------- custom ops and autograd
@torch.library.custom_op(f"{NAMESPACE}::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_forward(x, bias)


@_bias_gelu_fwd_op.register_fake
def _(x, bias):
    # the real op returns a fresh contiguous tensor whatever x's strides; so must the fake
    return x.new_empty(x.shape, dtype=torch.result_type(x, bias))


@torch.library.custom_op(f"{NAMESPACE}::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bias_gelu_backward(dy, x, bias)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return _bias_gelu_bwd_op(dy, x, bias)


_bias_gelu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Same signature and semantics as ``reference.bias_gelu``."""
    return _bias_gelu_fwd_op(x, bias)
