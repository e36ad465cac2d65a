"""Fused depthwise convolution along the sequence + bias + exact GELU, forward and backward.

``y[b, t, c] = gelu(bias[c] + sum_j w[c, j] * (x * m)[b, t + j - k // 2, c])`` with "same" zero
padding and pad tokens (``token_mask`` False) zeroed in the input. Rows are the flattened
``b * T + t``; a tap reaching outside ``[0, T)`` of its own sequence reads zero.
Forward: one pass. Backward: pass 1 recomputes the pre-activation from x (nothing but x is saved),
forms ``dz = dy * gelu'(z)`` and reduces dbias and dweight per program; pass 2 gathers
``dx = m * sum_j w[:, j] * dz[t - j + k // 2]``. The k taps are one 3-D tile ([rows, taps, channels]).
Reference: ``nasfast.kernels.reference.dwconv_bias_gelu``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nasfast.kernels._common import (
    NAMESPACE,
    acc_torch_dtype,
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
def _taps(SRC, TM, rows, cols, N, T, H, stride_src, sign,
          ACC: tl.constexpr, HAS_MASK: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K, BLOCK_H] tile of SRC[row + sign * (j - K // 2), col], zero outside the
    sequence, beyond K taps, at pad tokens (when HAS_MASK) and outside [N) x [H)."""
    j = tl.arange(0, BLOCK_K)
    shift = sign * (j - K // 2)
    t = rows % T
    src_t = t[:, None] + shift[None, :]                      # [M, K]
    ok = (rows[:, None] < N) & (src_t >= 0) & (src_t < T) & (j[None, :] < K)
    src = rows[:, None] + shift[None, :]
    if HAS_MASK:
        ok = ok & (tl.load(TM + src, mask=ok, other=0) != 0)
    ok3 = ok[:, :, None] & (cols[None, None, :] < H)
    ptr = SRC + src.to(tl.int64)[:, :, None] * stride_src + cols[None, None, :]
    return tl.load(ptr, mask=ok3, other=0.0).to(ACC)


@triton.jit
def _weights(W, cols, H, stride_wh, stride_wk, ACC: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_H] tile of W[col, j] (zero beyond K / H)."""
    j = tl.arange(0, BLOCK_K)
    ok = (j[:, None] < K) & (cols[None, :] < H)
    return tl.load(W + cols[None, :] * stride_wh + j[:, None] * stride_wk, mask=ok, other=0.0).to(ACC)


@triton.jit
def _dwconv_fwd_kernel(
    X,          # pointer, [N, H] input rows (N = B * T), last dim contiguous
    TM,         # pointer, [N] int8 token mask (1 = real token); read only when HAS_MASK
    W,          # pointer, [H, K] depthwise weights
    BIAS,       # pointer, [H] bias (contiguous)
    Y,          # pointer, [N, H] output
    N,          # int, rows (B * T)
    T,          # int, sequence length
    H,          # int, channels
    stride_x,   # int, row stride of X
    stride_y,   # int, row stride of Y
    stride_wh,  # int, W stride over channels
    stride_wk,  # int, W stride over taps
    ACC: tl.constexpr,       # compute dtype
    HAS_MASK: tl.constexpr,  # whether TM is given
    K: tl.constexpr,         # kernel width (odd)
    BLOCK_K: tl.constexpr,   # next power of two >= K
    BLOCK_M: tl.constexpr,   # rows per program
    BLOCK_H: tl.constexpr,   # channels per program
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    xs = _taps(X, TM, rows, cols, N, T, H, stride_x, 1, ACC, HAS_MASK, K, BLOCK_K)
    w = _weights(W, cols, H, stride_wh, stride_wk, ACC, K, BLOCK_K)
    b = tl.load(BIAS + cols, mask=cols < H, other=0.0).to(ACC)
    z = tl.sum(xs * w[None, :, :], axis=1) + b[None, :]
    mask = (rows[:, None] < N) & (cols[None, :] < H)
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], gelu(z), mask=mask)


@triton.jit
def _dwconv_bwd_dz_kernel(
    DY,         # pointer, [N, H] upstream gradient
    X,          # pointer, [N, H] saved input
    TM,         # pointer, [N] int8 token mask (HAS_MASK)
    W,          # pointer, [H, K] weights
    BIAS,       # pointer, [H] bias (contiguous)
    DZ,         # pointer, [N, H] ACC output: gradient of the pre-activation
    DW_PART,    # pointer, [chunks, BLOCK_K, H] ACC output: partial dweight (tap-major)
    DB_PART,    # pointer, [chunks, H] ACC output: partial dbias
    N, T, H,    # int, rows, sequence length, channels
    stride_dy,  # int, row stride of DY
    stride_x,   # int, row stride of X
    stride_wh, stride_wk,  # int, W strides (channel, tap)
    rows_per_chunk,        # int, rows per program (multiple of BLOCK_M)
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per loop iteration
    BLOCK_H: tl.constexpr,  # channels per program
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = _weights(W, cols, H, stride_wh, stride_wk, ACC, K, BLOCK_K)
    b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_K, BLOCK_H], dtype=ACC)
    db = tl.zeros([BLOCK_H], dtype=ACC)
    start = chunk * rows_per_chunk
    for r0 in range(0, rows_per_chunk, BLOCK_M):
        rows = start + r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < N) & cmask[None, :]
        xs = _taps(X, TM, rows, cols, N, T, H, stride_x, 1, ACC, HAS_MASK, K, BLOCK_K)
        z = tl.sum(xs * w[None, :, :], axis=1) + b[None, :]
        off = rows.to(tl.int64)[:, None] * stride_dy + cols[None, :]
        dy = tl.load(DY + off, mask=mask, other=0.0).to(ACC)
        dz = tl.where(mask, dy * gelu_grad(z), 0.0)
        tl.store(DZ + rows.to(tl.int64)[:, None] * H + cols[None, :], dz, mask=mask)
        db += tl.sum(dz, axis=0)
        dw += tl.sum(dz[:, None, :] * xs, axis=0)
    j = tl.arange(0, BLOCK_K)
    tl.store(DW_PART + chunk * BLOCK_K * H + j[:, None] * H + cols[None, :], dw,
             mask=(j[:, None] < K) & cmask[None, :])
    tl.store(DB_PART + chunk * H + cols, db, mask=cmask)


@triton.jit
def _dwconv_bwd_dx_kernel(
    DZ,         # pointer, [N, H] ACC gradient of the pre-activation (contiguous)
    TM,         # pointer, [N] int8 token mask (HAS_MASK)
    W,          # pointer, [H, K] weights
    DX,         # pointer, [N, H] output: gradient of x
    N, T, H,    # int, rows, sequence length, channels
    stride_dx,  # int, row stride of DX
    stride_wh, stride_wk,  # int, W strides
    ACC: tl.constexpr, HAS_MASK: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # dx[s] = m[s] * sum_j w[j] * dz[s - (j - K//2)]: the taps mirrored (sign -1), no mask on dz
    dzs = _taps(DZ, TM, rows, cols, N, T, H, H, -1, ACC, False, K, BLOCK_K)
    w = _weights(W, cols, H, stride_wh, stride_wk, ACC, K, BLOCK_K)
    dx = tl.sum(dzs * w[None, :, :], axis=1)
    rmask = rows < N
    if HAS_MASK:
        m = tl.load(TM + rows, mask=rmask, other=0) != 0
        dx = tl.where(m[:, None], dx, 0.0)
    mask = rmask[:, None] & (cols[None, :] < H)
    tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], dx, mask=mask)


# --------------------------------------------------------------------------------------- launchers
def _prep(x, weight, token_mask):
    b, t, h = x.shape
    k = weight.shape[-1]
    if k % 2 != 1:
        raise ValueError(f"dwconv_bias_gelu: kernel width must be odd, got {k}")
    x2 = x.reshape(b * t, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tm = None
    if token_mask is not None:
        tm = token_mask.reshape(b * t).to(torch.bool).contiguous().view(torch.int8)
    return x2, tm, b * t, t, h, k


def _blocks(h: int, k: int, n: int):
    block_k = pow2(k)
    block_h = min(pow2(h), 4096 if interpreting() else 64)
    block_m = row_block(n, block_h * block_k, tile_budget() * 2)
    return block_k, block_h, block_m


def dwconv_forward(x, weight, bias, token_mask):
    x2, tm, n, t, h, k = _prep(x, weight, token_mask)
    bias = bias.contiguous()  # the kernels read BIAS + col (a view may be strided); W's strides are passed
    y = torch.empty((n, h), dtype=torch.result_type(x, weight), device=x.device)
    if n == 0:
        return y.reshape(x.shape)
    block_k, block_h, block_m = _blocks(h, k, n)
    grid = (triton.cdiv(n, block_m), triton.cdiv(h, block_h))
    _dwconv_fwd_kernel[grid](
        x2, tm if tm is not None else x2, weight, bias, y, n, t, h, x2.stride(0), y.stride(0),
        weight.stride(0), weight.stride(1),
        ACC=acc_type(x, weight, bias), HAS_MASK=tm is not None, K=k, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_H=block_h,
    )
    return y.reshape(x.shape)


def dwconv_backward(dy, x, weight, bias, token_mask):
    """Returns (dx, dweight, dbias)."""
    x2, tm, n, t, h, k = _prep(x, weight, token_mask)
    bias = bias.contiguous()
    if n == 0:  # empty batch or sequence: nothing to launch, zero parameter gradients
        return x.new_empty(x.shape), weight.new_zeros(weight.shape), bias.new_zeros(bias.shape)
    dy2 = dy.reshape(n, h)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    acc = acc_type(x, weight, bias, dy)
    acc_t = acc_torch_dtype(x, weight, bias, dy)
    block_k, block_h, block_m = _blocks(h, k, n)
    col_blocks = triton.cdiv(h, block_h)
    chunks = max(1, min(triton.cdiv(max(n, 1), block_m), num_programs_target(x.device) // col_blocks))
    rows_per_chunk = triton.cdiv(triton.cdiv(max(n, 1), chunks), block_m) * block_m
    chunks = triton.cdiv(max(n, 1), rows_per_chunk)
    dz = torch.empty((n, h), dtype=acc_t, device=x.device)
    dw_part = torch.empty((chunks, block_k, h), dtype=acc_t, device=x.device)
    db_part = torch.empty((chunks, h), dtype=acc_t, device=x.device)
    tm_arg = tm if tm is not None else x2
    _dwconv_bwd_dz_kernel[(chunks, col_blocks)](
        dy2, x2, tm_arg, weight, bias, dz, dw_part, db_part, n, t, h, dy2.stride(0), x2.stride(0),
        weight.stride(0), weight.stride(1), rows_per_chunk,
        ACC=acc, HAS_MASK=tm is not None, K=k, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_H=block_h,
    )
    dx = torch.empty((n, h), dtype=x.dtype, device=x.device)
    _dwconv_bwd_dx_kernel[(triton.cdiv(n, block_m), col_blocks)](
        dz, tm_arg, weight, dx, n, t, h, dx.stride(0), weight.stride(0), weight.stride(1),
        ACC=acc, HAS_MASK=tm is not None, K=k, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_H=block_h,
    )
    dweight = dw_part[:, :k].sum(0).t().contiguous().to(weight.dtype)
    return dx.reshape(x.shape), dweight, db_part.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------- custom ops and autograd
@torch.library.custom_op(f"{NAMESPACE}::dwconv_bias_gelu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return dwconv_forward(x, weight, bias, token_mask)


@_fwd_op.register_fake
def _(x, weight, bias, token_mask):
    # the real op returns a fresh contiguous tensor whatever x's strides; so must the fake
    return x.new_empty(x.shape, dtype=torch.result_type(x, weight))


@torch.library.custom_op(f"{NAMESPACE}::dwconv_bias_gelu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            token_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dwconv_backward(dy, x, weight, bias, token_mask)


@_bwd_op.register_fake
def _(dy, x, weight, bias, token_mask):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, weight, bias, token_mask = ctx.saved_tensors
    dx, dweight, dbias = _bwd_op(dy, x, weight, bias, token_mask)
    return dx, dweight, dbias, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def dwconv_bias_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Same signature and semantics as ``reference.dwconv_bias_gelu``."""
    return _fwd_op(x, weight, bias, token_mask)
