"""Fused residual add + dropout + LayerNorm (post-LN sub-layer tail), forward and backward.

``y = LayerNorm(residual + dropout(x))`` over the last dim H, one program per block of rows.

Dropout RNG scheme: each call draws one int64 ``seed`` from torch's RNG (``torch.randint`` on the
input's device, so ``torch.manual_seed`` makes it deterministic); the keep decision of element
``(row, col)`` is ``tl.rand(seed, row * H + col) >= p`` (Philox, counter = flat element index).
The mask is regenerated from the seed in backward, never stored. Tests reproduce it with
``draw_seed`` + ``dropout_keep_mask``; an explicit ``keep_mask`` (as in the reference) is honoured.
Backward recomputes ``residual + dropout(x)`` from the saved inputs and the saved per-row
mean / rstd, and reduces dW / dB per program before one small torch sum.
Reference: ``nasfast.kernels.reference.add_dropout_layernorm``.
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
    num_programs_target,
    pow2,
    row_block,
    tile_budget,
)

# DROPOUT modes (constexpr): none, regenerate from seed, explicit keep mask.
_NONE, _SEED, _MASK = 0, 1, 2


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _keep(SEED, rows, cols, H, p):
    """Keep decision for elements (rows, cols) of an [N, H] tensor: Philox uniform >= p."""
    seed = tl.load(SEED)
    offs = rows[:, None] * H + cols[None, :]
    return tl.rand(seed, offs) >= p


@triton.jit
def _load_z(X, RES, KEEP, SEED, rows, cols, mask, H, stride_x, stride_r, stride_k, p,
            ACC: tl.constexpr, DROPOUT: tl.constexpr):
    """residual + dropout(x) for a tile, in ACC, zero outside ``mask``; also returns x*keep*scale's factor."""
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    r = tl.load(RES + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(ACC)
    if DROPOUT == 1:
        keep = _keep(SEED, rows, cols, H, p)
    elif DROPOUT == 2:
        keep = tl.load(KEEP + rows64[:, None] * stride_k + cols[None, :], mask=mask, other=0) != 0
    else:
        keep = mask
    # multiply-then-divide in the order of the reference: x * keep / (1 - p)
    factor = tl.where(keep & mask, 1.0, 0.0).to(ACC) / (1.0 - p)
    return r + x * factor, factor


@triton.jit
def _add_dropout_ln_fwd_kernel(
    X,          # pointer, [N, H] sub-layer output to drop out
    RES,        # pointer, [N, H] residual
    W,          # pointer, [H] LayerNorm weight (contiguous)
    B,          # pointer, [H] LayerNorm bias (contiguous)
    KEEP,       # pointer, [N, H] bool/uint8 keep mask (read only when DROPOUT == 2)
    SEED,       # pointer, [1] int64 dropout seed (read only when DROPOUT == 1)
    Y,          # pointer, [N, H] output
    MEAN,       # pointer, [N] ACC output: per-row mean (saved for backward)
    RSTD,       # pointer, [N] ACC output: per-row 1/sqrt(var + eps)
    N,          # int, rows
    H,          # int, hidden size (normalised dim)
    stride_x,   # int, row stride of X (last dim contiguous, same for all [N, H] tensors below)
    stride_r,   # int, row stride of RES
    stride_k,   # int, row stride of KEEP
    stride_y,   # int, row stride of Y
    p,          # float, dropout probability (0 when DROPOUT == 0)
    eps,        # float, LayerNorm epsilon
    ACC: tl.constexpr,       # compute dtype
    DROPOUT: tl.constexpr,   # 0 none, 1 seed, 2 explicit mask
    BLOCK_M: tl.constexpr,   # rows per program
    BLOCK_H: tl.constexpr,   # next power of two >= H
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    mask = (rows[:, None] < N) & cmask[None, :]
    z, _ = _load_z(X, RES, KEEP, SEED, rows, cols, mask, H, stride_x, stride_r, stride_k, p, ACC, DROPOUT)
    mean = tl.sum(z, axis=1) / H
    diff = tl.where(mask, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / H + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y, mask=mask)
    tl.store(MEAN + rows, mean, mask=rows < N)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def _add_dropout_ln_bwd_kernel(
    DY,         # pointer, [N, H] upstream gradient
    X,          # pointer, [N, H] saved sub-layer output
    RES,        # pointer, [N, H] saved residual
    W,          # pointer, [H] LayerNorm weight (contiguous)
    KEEP,       # pointer, [N, H] keep mask (DROPOUT == 2)
    SEED,       # pointer, [1] int64 seed (DROPOUT == 1)
    MEAN,       # pointer, [N] saved row means
    RSTD,       # pointer, [N] saved row rstd
    DX,         # pointer, [N, H] output: grad of x
    DRES,       # pointer, [N, H] output: grad of residual
    DW_PART,    # pointer, [chunks, H] ACC output: partial dW per program
    DB_PART,    # pointer, [chunks, H] ACC output: partial dB per program
    N,          # int, rows
    H,          # int, hidden size
    stride_dy,  # int, row stride of DY
    stride_x,   # int, row stride of X
    stride_r,   # int, row stride of RES
    stride_k,   # int, row stride of KEEP
    stride_dx,  # int, row stride of DX (DRES shares it)
    rows_per_chunk,  # int, rows per program (multiple of BLOCK_M)
    p,          # float, dropout probability
    ACC: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,   # rows per loop iteration
    BLOCK_H: tl.constexpr,   # next power of two >= H
):
    chunk = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_H], dtype=ACC)
    db = tl.zeros([BLOCK_H], dtype=ACC)
    start = chunk * rows_per_chunk
    for r0 in range(0, rows_per_chunk, BLOCK_M):
        rows = start + r0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        z, factor = _load_z(X, RES, KEEP, SEED, rows, cols, mask, H, stride_x, stride_r, stride_k, p, ACC, DROPOUT)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0).to(ACC)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(wdy * xhat, axis=1) / H
        c2 = tl.sum(wdy, axis=1) / H
        dz = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        out = rows64[:, None] * stride_dx + cols[None, :]
        tl.store(DRES + out, dz, mask=mask)
        tl.store(DX + out, dz * factor, mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_PART + chunk * H + cols, dw, mask=cmask)
    tl.store(DB_PART + chunk * H + cols, db, mask=cmask)


@triton.jit
def _keep_mask_kernel(
    SEED,       # pointer, [1] int64 seed
    KEEP,       # pointer, [N, H] bool output (stored as int8 view)
    N,          # int, rows
    H,          # int, hidden size
    p,          # float, dropout probability
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < N) & (cols[None, :] < H)
    keep = _keep(SEED, rows, cols, H, p)
    tl.store(KEEP + rows.to(tl.int64)[:, None] * H + cols[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------- launchers
def draw_seed(device: torch.device | str) -> torch.Tensor:
    """One dropout seed from torch's RNG on ``device`` (no host sync; deterministic under manual_seed)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def _rows(t: torch.Tensor, h: int) -> torch.Tensor:
    t = t.reshape(-1, h)
    return t if t.stride(-1) == 1 else t.contiguous()


def _mode(p: float, seed: Optional[torch.Tensor], keep_mask: Optional[torch.Tensor]) -> int:
    if p <= 0.0:
        return _NONE
    if keep_mask is not None:
        return _MASK
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed or a keep_mask")
    return _SEED


def _keep_arg(keep_mask: Optional[torch.Tensor], h: int, like: torch.Tensor) -> torch.Tensor:
    if keep_mask is None:
        return like  # never read
    k = _rows(keep_mask, h)
    return k.view(torch.int8) if k.dtype == torch.bool else k


def _block_h(h: int) -> int:
    return pow2(h, 16)


def add_dropout_layernorm_forward(x, residual, weight, bias, p: float, eps: float,
                                  seed: Optional[torch.Tensor] = None, keep_mask: Optional[torch.Tensor] = None):
    """Returns (y, mean, rstd); mean/rstd are [N] in the accumulation dtype."""
    h = x.shape[-1]
    x2, r2 = _rows(x, h), _rows(residual, h)
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernel reads W + col (a view may be strided)
    n = x2.shape[0]
    if n * h >= 2**31:
        raise ValueError("add_dropout_layernorm: more than 2^31 elements (Philox counter is 32-bit)")
    mode = _mode(p, seed, keep_mask)
    acc = acc_type(x, residual, weight)
    y = torch.empty((n, h), dtype=torch.result_type(x, residual), device=x.device)
    mean = torch.empty(n, dtype=acc_torch_dtype(x, residual, weight), device=x.device)
    rstd = torch.empty_like(mean)
    keep = _keep_arg(keep_mask, h, x2)
    seed_arg = seed if seed is not None else mean
    block_h = _block_h(h)
    block_m = row_block(n, block_h, tile_budget())
    _add_dropout_ln_fwd_kernel[(triton.cdiv(max(n, 1), block_m),)](
        x2, r2, weight, bias, keep, seed_arg, y, mean, rstd, n, h,
        x2.stride(0), r2.stride(0), keep.stride(0), y.stride(0), float(p if mode else 0.0), float(eps),
        ACC=acc, DROPOUT=mode, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=4 if block_h <= 1024 else 8,
    )
    return y.reshape(x.shape), mean, rstd


def add_dropout_layernorm_backward(dy, x, residual, weight, mean, rstd, p: float,
                                   seed: Optional[torch.Tensor] = None, keep_mask: Optional[torch.Tensor] = None):
    """Returns (dx, dresidual, dweight, dbias)."""
    h = x.shape[-1]
    x2, r2, dy2 = _rows(x, h), _rows(residual, h), _rows(dy, h)
    weight_c = weight.contiguous()  # the kernel reads W + col (a view may be strided)
    n = x2.shape[0]
    mode = _mode(p, seed, keep_mask)
    acc = acc_type(x, residual, weight, dy)
    keep = _keep_arg(keep_mask, h, x2)
    seed_arg = seed if seed is not None else mean
    dx = torch.empty((n, h), dtype=x.dtype, device=x.device)
    dres = torch.empty((n, h), dtype=residual.dtype, device=x.device)
    block_h = _block_h(h)
    block_m = row_block(n, block_h, tile_budget())
    chunks = max(1, min(triton.cdiv(max(n, 1), block_m), num_programs_target(x.device)))
    rows_per_chunk = triton.cdiv(triton.cdiv(max(n, 1), chunks), block_m) * block_m
    chunks = triton.cdiv(max(n, 1), rows_per_chunk)
    part_dtype = torch.float64 if acc == tl.float64 else torch.float32
    dw_part = torch.empty((chunks, h), dtype=part_dtype, device=x.device)
    db_part = torch.empty((chunks, h), dtype=part_dtype, device=x.device)
    _add_dropout_ln_bwd_kernel[(chunks,)](
        dy2, x2, r2, weight_c, keep, seed_arg, mean, rstd, dx, dres, dw_part, db_part, n, h,
        dy2.stride(0), x2.stride(0), r2.stride(0), keep.stride(0), dx.stride(0), rows_per_chunk,
        float(p if mode else 0.0),
        ACC=acc, DROPOUT=mode, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=4 if block_h <= 1024 else 8,
    )
    return (dx.reshape(x.shape), dres.reshape(residual.shape),
            dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype))


def dropout_keep_mask(seed: torch.Tensor, shape, p: float) -> torch.Tensor:
    """The keep mask (bool, ``shape``) that the kernels derive from ``seed`` (test/debug hook)."""
    h = shape[-1]
    n = 1
    for s in shape[:-1]:
        n *= s
    keep = torch.empty((n, h), dtype=torch.int8, device=seed.device)
    block_h = _block_h(h)
    block_m = row_block(n, block_h, tile_budget())
    _keep_mask_kernel[(triton.cdiv(max(n, 1), block_m),)](seed, keep, n, h, float(p), BLOCK_M=block_m, BLOCK_H=block_h)
    return keep.view(torch.bool).reshape(shape)


# ----------------------------------------------------------------------- custom ops and autograd
@torch.library.custom_op(f"{NAMESPACE}::add_dropout_layernorm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float,
            eps: float, seed: Optional[torch.Tensor], keep_mask: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_dropout_layernorm_forward(x, residual, weight, bias, p, eps, seed, keep_mask)


@_fwd_op.register_fake
def _(x, residual, weight, bias, p, eps, seed, keep_mask):
    n = x.numel() // x.shape[-1]
    stat = x.new_empty(n, dtype=acc_torch_dtype(x, residual, weight))
    # the real op returns fresh contiguous tensors whatever the inputs' strides; so must the fake
    return x.new_empty(x.shape, dtype=torch.result_type(x, residual)), stat, torch.empty_like(stat)


@torch.library.custom_op(f"{NAMESPACE}::add_dropout_layernorm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
            rstd: torch.Tensor, p: float, seed: Optional[torch.Tensor], keep_mask: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_dropout_layernorm_backward(dy, x, residual, weight, mean, rstd, p, seed, keep_mask)


@_bwd_op.register_fake
def _(dy, x, residual, weight, mean, rstd, p, seed, keep_mask):
    return x.new_empty(x.shape), residual.new_empty(residual.shape), weight.new_empty(weight.shape), \
        weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, p, eps, seed, keep_mask = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed, keep_mask)
    ctx.p = p


def _backward(ctx, dy, dmean, drstd):
    x, residual, weight, mean, rstd, seed, keep_mask = ctx.saved_tensors
    dx, dres, dw, db = _bwd_op(dy, x, residual, weight, mean, rstd, ctx.p, seed, keep_mask)
    return dx, dres, dw, db, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
    """Same signature and semantics as ``reference.add_dropout_layernorm``."""
    p = float(dropout_p) if (training and dropout_p > 0.0) else 0.0
    if p >= 1.0:
        raise ValueError("dropout_p must be < 1")
    seed = draw_seed(x.device) if (p > 0.0 and keep_mask is None) else None
    if p == 0.0:
        keep_mask = None
    return _fwd_op(x, residual, weight, bias, p, float(eps), seed, keep_mask)[0]
