"""Flash-style softmax attention with a key-padding mask, forward and backward.

q, k, v are [B, h, T, dh] (any strides; a last dim that is not contiguous is copied); o and all
gradients are fresh contiguous tensors. Forward: online softmax over key blocks (exp2 domain), never
materialising the [T, T] scores; it saves o and, per query row, the score maximum m and log2 of the
row sum l as two numbers (``stats[0]``, ``stats[1]``), not their sum: with saturated scores
(|s| ~ 1e3) an fp32 ``m + log2(l)`` would round away log2(l) and make every recomputed probability
off by ~1e-4 relative. Backward recomputes ``p = exp2((s - m) - log2(l))``. Padded keys get score
-inf, i.e. exactly zero probability; a row whose keys are all padding has l = 0 and outputs zeros
(as the reference defines), and its recomputed probabilities are all zero too. Backward
(FlashAttention-2 split): a small kernel forms delta = rowsum(o * do); one kernel per key block
accumulates dk, dv over query blocks; one kernel per query block accumulates dq over key blocks
(no atomics).

Accuracy (documented bound): ``ds = p * (dp - delta)`` with ``delta = rowsum(o * do)`` subtracts two
separately rounded dot products, ``do . v_j`` and ``do . o``. When a row's softmax is saturated
(one key takes all the probability: scores ~1e3, inputs ~N(0, 30^2)) the true ds is ~0 while each
term carries its own rounding, so dq and dk get an absolute error of about
``(sqrt(dh) + 1) * u * |do_i| * |v_j| * sm_scale * |k|`` (``|q|`` for dk; u the unit roundoff,
|.| of a row its 2-norm), where eager's softmax backward, which subtracts values derived from one
rounded dp, stays near 0. ``nasfast.kernels.builtin_ops.attention_rounding_allowance`` computes this
first-order bound (with that of rounding the scores themselves, which any implementation has),
and the tests hold both backends to it. Removing the term would take a second pass over all key
blocks to form delta from p and dp (~30% more backward work); ordinary training never reaches
such scores, and at inputs x5 the errors are within ~2x of eager's.
Reference: ``nasfast.kernels.reference.attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nasfast.kernels._common import NAMESPACE, acc_torch_dtype, dot_precision, interpreting, pow2

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _key_valid(TM, off_b, cols, T, HAS_MASK: tl.constexpr):
    """[BLOCK_N] bool: key index in range and (when HAS_MASK) a real token."""
    ok = cols < T
    if HAS_MASK:
        ok = ok & (tl.load(TM + off_b * T + cols, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,    # pointers, [B, h, T, dh] inputs
    TM,         # pointer, [B, T] int8 key mask (1 = real token); read only when HAS_MASK
    O,          # pointer, [B, h, T, dh] output
    RMAX,       # pointer, [B * h, T] ACC output: row max m of the scaled log2-domain scores (0 for all-pad rows)
    RLOG,       # pointer, [B * h, T] ACC output: log2 of the row sum of exp2(s - m) (0 for all-pad rows)
    sqb, sqh, sqt,   # int, Q strides (batch, head, time); dh stride is 1
    skb, skh, skt,   # int, K strides
    svb, svh, svt,   # int, V strides
    sob, soh, sot,   # int, O strides
    NH,         # int, heads
    T,          # int, sequence length
    DH,         # int, head dim
    qk_scale,   # float, dh ** -0.5 * log2(e)
    ACC: tl.constexpr,        # accumulation dtype (fp32, fp64 for fp64 inputs)
    DOT: tl.constexpr,        # dtype fed to tl.dot (the I/O dtype; fp32 for bf16 under the interpreter)
    PREC: tl.constexpr,       # tl.dot input_precision ("ieee" or "tf32")
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,    # query rows per program
    BLOCK_N: tl.constexpr,    # keys per loop iteration
    BLOCK_D: tl.constexpr,    # next power of two >= dh (>= 16)
):
    bh = tl.program_id(1)
    off_b = bh // NH
    off_h = bh % NH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    q_ptr = Q + off_b.to(tl.int64) * sqb + off_h * sqh
    k_ptr = K + off_b.to(tl.int64) * skb + off_h * skh
    v_ptr = V + off_b.to(tl.int64) * svb + off_h * svh
    qm = (rows[:, None] < T) & dmask[None, :]
    q = tl.load(q_ptr + rows[:, None] * sqt + d[None, :], mask=qm, other=0.0).to(DOT)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        valid = _key_valid(TM, off_b, cols, T, HAS_MASK)
        km = (cols[:, None] < T) & dmask[None, :]
        k = tl.load(k_ptr + cols[:, None] * skt + d[None, :], mask=km, other=0.0).to(DOT)
        v = tl.load(v_ptr + cols[:, None] * svt + d[None, :], mask=km, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    o_ptr = O + off_b.to(tl.int64) * sob + off_h * soh
    tl.store(o_ptr + rows[:, None] * sot + d[None, :], o, mask=qm)
    tl.store(RMAX + bh.to(tl.int64) * T + rows, tl.where(has_key, m_i, 0.0), mask=rows < T)
    tl.store(RLOG + bh.to(tl.int64) * T + rows, tl.where(has_key, tl.log2(tl.where(has_key, l_i, 1.0)), 0.0),
             mask=rows < T)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,      # pointers, [B, h, T, dh] forward output and its gradient
    DELTA,      # pointer, [B * h, T] ACC output: rowsum(o * do)
    sob, soh, sot,   # int, O strides
    sdb, sdh, sdt,   # int, DO strides
    NH, T, DH,  # int, heads, sequence length, head dim
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    off_b = bh // NH
    off_h = bh % NH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < T) & (d[None, :] < DH)
    o = tl.load(O + off_b.to(tl.int64) * sob + off_h * soh + rows[:, None] * sot + d[None, :], mask=m, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * sdb + off_h * sdh + rows[:, None] * sdt + d[None, :], mask=m, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,     # pointers, [B, h, T, dh]
    TM,              # pointer, [B, T] int8 key mask (HAS_MASK)
    RMAX, RLOG, DELTA,  # pointers, [B * h, T] ACC, from forward / the delta kernel
    DK, DV,          # pointers, [B, h, T, dh] outputs
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,  # int, strides of Q, K, V, DO
    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,                           # int, strides of DK, DV
    NH, T, DH,       # int
    sm_scale,        # float, dh ** -0.5
    qk_scale,        # float, sm_scale * log2(e)
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,   # query rows per loop iteration
    BLOCK_N: tl.constexpr,   # keys per program
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    off_b = bh // NH
    off_h = bh % NH
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    valid = _key_valid(TM, off_b, cols, T, HAS_MASK)
    km = (cols[:, None] < T) & dmask[None, :]
    k = tl.load(K + off_b.to(tl.int64) * skb + off_h * skh + cols[:, None] * skt + d[None, :], mask=km, other=0.0).to(DOT)
    v = tl.load(V + off_b.to(tl.int64) * svb + off_h * svh + cols[:, None] * svt + d[None, :], mask=km, other=0.0).to(DOT)
    q_ptr = Q + off_b.to(tl.int64) * sqb + off_h * sqh
    do_ptr = DO + off_b.to(tl.int64) * sdb + off_h * sdh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        rmask = rows < T
        qm = rmask[:, None] & dmask[None, :]
        q = tl.load(q_ptr + rows[:, None] * sqt + d[None, :], mask=qm, other=0.0).to(DOT)
        do = tl.load(do_ptr + rows[:, None] * sdt + d[None, :], mask=qm, other=0.0).to(DOT)
        rmax = tl.load(RMAX + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
        rlog = tl.load(RLOG + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        p = tl.where(rmask[:, None] & valid[None, :], tl.exp2((s - rmax[:, None]) - rlog[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(DOT)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(DOT)), q, input_precision=PREC, out_dtype=ACC)
    dk = dk * sm_scale
    tl.store(DK + off_b.to(tl.int64) * sdkb + off_h * sdkh + cols[:, None] * sdkt + d[None, :], dk, mask=km)
    tl.store(DV + off_b.to(tl.int64) * sdvb + off_h * sdvh + cols[:, None] * sdvt + d[None, :], dv, mask=km)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,     # pointers, [B, h, T, dh]
    TM,              # pointer, [B, T] int8 key mask (HAS_MASK)
    RMAX, RLOG, DELTA,  # pointers, [B * h, T] ACC
    DQ,              # pointer, [B, h, T, dh] output
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,  # int, strides of Q, K, V, DO
    sdqb, sdqh, sdqt,                                             # int, strides of DQ
    NH, T, DH,       # int
    sm_scale, qk_scale,   # float
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,   # query rows per program
    BLOCK_N: tl.constexpr,   # keys per loop iteration
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    off_b = bh // NH
    off_h = bh % NH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < DH
    qm = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + off_b.to(tl.int64) * sqb + off_h * sqh + rows[:, None] * sqt + d[None, :], mask=qm, other=0.0).to(DOT)
    do = tl.load(DO + off_b.to(tl.int64) * sdb + off_h * sdh + rows[:, None] * sdt + d[None, :], mask=qm, other=0.0).to(DOT)
    rmax = tl.load(RMAX + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    rlog = tl.load(RLOG + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=rmask, other=0.0)
    k_ptr = K + off_b.to(tl.int64) * skb + off_h * skh
    v_ptr = V + off_b.to(tl.int64) * svb + off_h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        valid = _key_valid(TM, off_b, cols, T, HAS_MASK)
        km = (cols[:, None] < T) & dmask[None, :]
        k = tl.load(k_ptr + cols[:, None] * skt + d[None, :], mask=km, other=0.0).to(DOT)
        v = tl.load(v_ptr + cols[:, None] * svt + d[None, :], mask=km, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        p = tl.where(rmask[:, None] & valid[None, :], tl.exp2((s - rmax[:, None]) - rlog[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision=PREC, out_dtype=ACC)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * sdqb + off_h * sdqh + rows[:, None] * sdqt + d[None, :], dq, mask=qm)


# --------------------------------------------------------------------------------------- launchers
def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _s(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _types(q: torch.Tensor):
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}.get(q.dtype, tl.float32)
    if dot == tl.bfloat16 and interpreting():
        dot = tl.float32  # the interpreter computes bf16 wrongly
    return acc, dot, dot_precision(q.dtype)


def _blocks(t: int, dh: int):
    block_d = pow2(dh, 16)
    if interpreting():
        b = min(pow2(t, 16), 128)
        return b, b, block_d, 4
    if block_d <= 128:
        return 64, 64, block_d, 4
    return 64, 32, block_d, 8


def _mask_arg(token_mask: Optional[torch.Tensor], like: torch.Tensor):
    if token_mask is None:
        return like, False
    return token_mask.to(torch.bool).contiguous().view(torch.int8), True


def attention_forward(q, k, v, token_mask):
    """Returns (o, stats); stats [2, B * h, T]: per query row, the score max and log2 of the row sum."""
    q, k, v = _dense(q), _dense(k), _dense(v)
    b, nh, t, dh = q.shape
    o = q.new_empty(q.shape)
    stats = torch.empty((2, b * nh, t), dtype=acc_torch_dtype(q), device=q.device)
    if q.numel() == 0:
        return o, stats
    acc, dot, prec = _types(q)
    block_m, block_n, block_d, warps = _blocks(t, dh)
    tm, has_mask = _mask_arg(token_mask, q)
    scale = dh ** -0.5
    _attn_fwd_kernel[(triton.cdiv(t, block_m), b * nh)](
        q, k, v, tm, o, stats[0], stats[1], *_s(q), *_s(k), *_s(v), *_s(o), nh, t, dh, scale * LOG2E,
        ACC=acc, DOT=dot, PREC=prec, HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=1 if interpreting() else 2,
    )
    return o, stats


def attention_backward(do, q, k, v, o, stats, token_mask):
    """Returns (dq, dk, dv)."""
    q, k, v, o, do = _dense(q), _dense(k), _dense(v), _dense(o), _dense(do)
    b, nh, t, dh = q.shape
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if q.numel() == 0:
        return dq, dk, dv
    acc, dot, prec = _types(q)
    block_m, block_n, block_d, warps = _blocks(t, dh)
    tm, has_mask = _mask_arg(token_mask, q)
    scale = dh ** -0.5
    delta = torch.empty_like(stats[0])
    _attn_bwd_delta_kernel[(triton.cdiv(t, block_m), b * nh)](
        o, do, delta, *_s(o), *_s(do), nh, t, dh, ACC=acc, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    common = dict(ACC=acc, DOT=dot, PREC=prec, HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=block_d, num_warps=warps, num_stages=1 if interpreting() else 2)
    _attn_bwd_dkdv_kernel[(triton.cdiv(t, block_n), b * nh)](
        q, k, v, do, tm, stats[0], stats[1], delta, dk, dv, *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv),
        nh, t, dh, scale, scale * LOG2E, **common,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(t, block_m), b * nh)](
        q, k, v, do, tm, stats[0], stats[1], delta, dq, *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq),
        nh, t, dh, scale, scale * LOG2E, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------- custom ops and autograd
@torch.library.custom_op(f"{NAMESPACE}::attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, token_mask)


@_fwd_op.register_fake
def _(q, k, v, token_mask):
    b, nh, t, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((2, b * nh, t), dtype=acc_torch_dtype(q))


@torch.library.custom_op(f"{NAMESPACE}::attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            stats: torch.Tensor, token_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, stats, token_mask)


@_bwd_op.register_fake
def _(do, q, k, v, o, stats, token_mask):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, token_mask = inputs
    o, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, o, stats, token_mask)


def _backward(ctx, do, dstats):
    q, k, v, o, stats, token_mask = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, stats, token_mask)
    return dq, dk, dv, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Same signature and semantics as ``reference.attention`` (q, k, v [B, h, T, dh], same dtype)."""
    return _fwd_op(q, k, v, token_mask)[0]
