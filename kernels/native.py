"""C++ CPU backend: the fused ops of ``nasfast.kernels.reference`` as ``torch.ops.nasfast.*``.

``nasfast.kernels.native_build`` builds and loads the C++ ops (on first use); this module is the
backend the registry reads by name: one thin ``torch.autograd.Function`` per op (forward/backward only
call ``torch.ops.nasfast.*`` and save tensors), then the functions with the reference signatures
(``linear`` is ATen's GEMMs with a GEMV bias gradient, no C++ of its own). fp32 and fp64 run
natively; other floating dtypes are computed in fp32 and cast back, except bf16/fp16 inference in
bias_gelu, qkv_attention and add_dropout_layernorm (see ``_half_inference``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from nasfast.kernels.native_build import available, ensure, why_unavailable  # noqa: F401 (the registry asks the backend)


def gemm_backend() -> str:
    """Which GEMM the fused attention uses: 'blas:sgemm_' (libtorch_cpu's BLAS) or 'aten'."""
    _require()
    return torch.ops.nasfast.gemm_backend()


def _require() -> None:
    if not ensure():
        raise RuntimeError(f"nasfast native ops unavailable: {why_unavailable()}")


# -------------------------------------------------------------------------------------- dtypes
def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _half_inference(*ts: torch.Tensor) -> bool:
    """bf16/fp16 inputs that record no autograd graph (MAGIC-A's bf16 anchor forward under no_grad):
    there the fp32 kernels would spend more time casting than computing, so qkv_attention runs
    ATen's fused attention in the input dtype (on the CPU's bf16 units where it has them), and
    bias_gelu and add_dropout_layernorm C++ forwards that widen each row in cache (fp32 math; the
    LayerNorm keeps an fp32 residual stream fp32). Training in bf16 keeps the fp32 kernels and their
    backward."""
    return ts[0].dtype in (torch.bfloat16, torch.float16) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in ts))


# ---------------------------------------------------------------------------- autograd Functions
class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        cd = _compute_dtype(x, bias)
        xc, bc = _as(x, cd), _as(bias, cd)
        ctx.save_for_backward(xc, bc)
        ctx.dtypes = (x.dtype, bias.dtype)
        return _as(torch.ops.nasfast.bias_gelu_fwd(xc, bc), torch.promote_types(x.dtype, bias.dtype))

    @staticmethod
    def backward(ctx, grad):
        xc, bc = ctx.saved_tensors
        dx, db = torch.ops.nasfast.bias_gelu_bwd(_as(grad, xc.dtype), xc, bc)
        return _as(dx, ctx.dtypes[0]), _as(db, ctx.dtypes[1])


class _AddDropoutLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, p, keep_mask, seed, eps):
        cd = _compute_dtype(x, residual, weight, bias)
        xc, rc, wc, bc = (_as(t, cd) for t in (x, residual, weight, bias))
        y, mean, rstd = torch.ops.nasfast.add_dropout_layernorm_fwd(xc, rc, wc, bc, p, keep_mask, seed, eps)
        ctx.save_for_backward(xc, rc, wc, mean, rstd, keep_mask)
        ctx.p, ctx.seed = p, seed
        ctx.dtypes = (x.dtype, residual.dtype, weight.dtype, bias.dtype)
        return _as(y, torch.promote_types(x.dtype, residual.dtype))

    @staticmethod
    def backward(ctx, grad):
        xc, rc, wc, mean, rstd, keep_mask = ctx.saved_tensors
        grads = torch.ops.nasfast.add_dropout_layernorm_bwd(
            _as(grad, xc.dtype), xc, rc, wc, mean, rstd, ctx.p, keep_mask, ctx.seed
        )
        return (*(_as(g, d) for g, d in zip(grads, ctx.dtypes)), None, None, None, None)


class _Dropout(torch.autograd.Function):
    """Forward and backward are the same C++ map (same pattern): nothing is saved but the keep mask."""

    @staticmethod
    def forward(ctx, x, p, keep_mask, seed):
        cd = _compute_dtype(x)
        ctx.p, ctx.seed, ctx.dtype = p, seed, x.dtype
        ctx.save_for_backward(keep_mask)
        return _as(torch.ops.nasfast.dropout_apply(_as(x, cd), p, keep_mask, seed), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (keep_mask,) = ctx.saved_tensors
        dx = torch.ops.nasfast.dropout_apply(_as(grad, _compute_dtype(grad)), ctx.p, keep_mask, ctx.seed)
        return _as(dx, ctx.dtype), None, None, None


class _DwconvBiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, token_mask):
        cd = _compute_dtype(x, weight, bias)
        xc, wc, bc = _as(x, cd), _as(weight, cd), _as(bias, cd)
        ctx.save_for_backward(xc, wc, bc, token_mask)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return _as(torch.ops.nasfast.dwconv_bias_gelu_fwd(xc, wc, bc, token_mask), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xc, wc, bc, token_mask = ctx.saved_tensors
        grads = torch.ops.nasfast.dwconv_bias_gelu_bwd(_as(grad, xc.dtype), xc, wc, bc, token_mask)
        return (*(_as(g, d) for g, d in zip(grads, ctx.dtypes)), None)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, token_mask):
        cd = _compute_dtype(q, k, v)
        qc, kc, vc = _as(q, cd), _as(k, cd), _as(v, cd)
        out, lse = torch.ops.nasfast.attention_fwd(qc, kc, vc, token_mask)
        ctx.save_for_backward(qc, kc, vc, out, lse, token_mask)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return _as(out, q.dtype)

    @staticmethod
    def backward(ctx, grad):
        qc, kc, vc, out, lse, token_mask = ctx.saved_tensors
        grads = torch.ops.nasfast.attention_bwd(_as(grad, qc.dtype), qc, kc, vc, out, lse, token_mask)
        return (*(_as(g, d) for g, d in zip(grads, ctx.dtypes)), None)


class _QKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, heads, token_mask):
        cd = _compute_dtype(qkv)
        qc = _as(qkv, cd)
        out, _lse = torch.ops.nasfast.attention_qkv_fwd(qc, heads, token_mask)
        ctx.save_for_backward(qc, token_mask)
        ctx.heads, ctx.dtype = heads, qkv.dtype
        return _as(out, qkv.dtype)

    @staticmethod
    def backward(ctx, grad):
        qc, token_mask = ctx.saved_tensors
        dqkv = torch.ops.nasfast.attention_qkv_bwd(_as(grad, qc.dtype), qc, ctx.heads, token_mask)
        return _as(dqkv, ctx.dtype), None, None


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        lc = _as(logits, _compute_dtype(logits))
        loss, lse = torch.ops.nasfast.cross_entropy_fwd(lc, targets)
        ctx.save_for_backward(lc, targets, lse)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        lc, targets, lse = ctx.saved_tensors
        return _as(torch.ops.nasfast.cross_entropy_bwd(grad, lc, targets, lse), ctx.dtype), None


class _AlignmentLoss(torch.autograd.Function):
    """Inputs: token_mask, n_layers, *child_hiddens, *anchor_hiddens (anchors detached)."""

    @staticmethod
    def forward(ctx, token_mask, n, *hiddens):
        child, anchor = hiddens[:n], hiddens[n:]
        cd = _compute_dtype(*hiddens)
        need_grad = any(ctx.needs_input_grad[2 : 2 + n])
        loss, grads = torch.ops.nasfast.alignment_loss_fwd(
            [_as(h, cd) for h in child], [_as(a, cd) for a in anchor], token_mask, need_grad
        )
        ctx.save_for_backward(*grads)
        ctx.n, ctx.dtypes = n, [h.dtype for h in child]
        return loss if cd == torch.float64 else _as(loss, torch.float32)

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.saved_tensors
        g = [None] * ctx.n
        if grads:
            g = [_as(gl * grad.to(gl.dtype), d) if ctx.needs_input_grad[2 + i] else None
                 for i, (gl, d) in enumerate(zip(grads, ctx.dtypes))]
        return (None, None, *g, *([None] * ctx.n))


class _Linear(torch.autograd.Function):
    """addmm forward (what F.linear runs); backward with the bias gradient as a GEMV (ones^T @ grad):
    aten's column sum over [rows, N] ran ~8x slower than MKL's sgemv at [4096, 1536] on 2 cores."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        dx = g2.mm(weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = g2.t().mm(x2) if ctx.needs_input_grad[1] else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = torch.mv(g2.t(), g2.new_ones(g2.shape[0]))
        return dx, dw, db


# ------------------------------------------------------------------- reference-signature functions
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FFN inner activation: exact (erf) GELU of ``x + bias``. x [..., D], bias [D]."""
    _require()
    if _half_inference(x, bias) and bias.dtype == x.dtype:  # else the output promotes, as the reference's
        return torch.ops.nasfast.bias_gelu_fwd_half(x, bias)  # fp32 math per row in cache (see _half_inference)
    return _BiasGelu.apply(x, bias)


def _draw_seed() -> int:
    """The dropout hash's seed, from torch's default generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


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
    """``LayerNorm(residual + dropout(x))`` over the last dim H.

    Without ``keep_mask`` the keep pattern is a counter hash of (seed, position) with the seed drawn
    from torch's default generator, so ``torch.manual_seed`` makes it reproducible (its pattern is
    not the one eager's ``rand_like`` would draw). ``keep_mask`` fixes the pattern exactly.
    """
    _require()
    p = float(dropout_p) if (training and dropout_p > 0.0) else 0.0
    seed = _draw_seed() if p > 0.0 and keep_mask is None else 0
    if p == 0.0:
        keep_mask = None
    if _half_inference(x, residual, weight, bias) and residual.dtype in (x.dtype, torch.float32):
        # widened per row inside the op (same keep pattern as the fp32 kernel): no full-size casts
        return torch.ops.nasfast.add_dropout_layernorm_fwd_half(x, residual, weight, bias, p, keep_mask, seed, float(eps))
    return _AddDropoutLayerNorm.apply(x, residual, weight, bias, p, keep_mask, seed, float(eps))


def dropout(x: torch.Tensor, p: float, training: bool, keep_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverted dropout; without ``keep_mask`` the pattern is the counter hash of
    :func:`add_dropout_layernorm` (seed from torch's default generator), not torch's bernoulli draw."""
    _require()
    p = float(p) if (training and p > 0.0) else 0.0
    if p == 0.0:
        return x
    seed = _draw_seed() if keep_mask is None else 0
    return _Dropout.apply(x, p, keep_mask, seed)


def dwconv_bias_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Depthwise conv (odd width, "same" zero padding, pad tokens zeroed) + bias + GELU. x [B, T, H]."""
    _require()
    return _DwconvBiasGelu.apply(x, weight, bias, token_mask)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Softmax attention with a key-padding mask; all-padding query rows output zeros."""
    _require()
    return _Attention.apply(q, k, v, token_mask)


def alignment_loss(
    child_hiddens: Sequence[torch.Tensor],
    anchor_hiddens: Sequence[torch.Tensor],
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MAGIC-A alignment ``sum_l mean((h_l - a_l)^2)`` over real tokens and H (anchors detached).

    The loss is fp32 (fp64 when the hiddens are fp64, so gradcheck can run in double).
    """
    _require()
    from nasfast.kernels.reference import check_alignment_shapes

    child = list(child_hiddens)
    anchor = [a.detach() for a in anchor_hiddens][: len(child)]
    child = child[: len(anchor)]
    check_alignment_shapes(child, anchor)  # the error every backend gives
    return _AlignmentLoss.apply(token_mask, len(child), *child, *anchor)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of logits [M, V] against int64 targets [M], loss and gradient each in
    one pass over the logits (fp32; fp64 for fp64 logits; other dtypes are computed in fp32)."""
    _require()
    return _CrossEntropy.apply(logits, targets)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias`` with a GEMV bias gradient (see _Linear). Under autocast, or for dtypes
    the candidates do not train in, it is F.linear (autocast casts F.linear's inputs, not ours)."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.float32, torch.float64) \
            or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return torch.nn.functional.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


def qkv_attention(qkv: torch.Tensor, heads: int, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`attention` on a packed qkv [B, T, 3H] -> [B, T, H], read and written in place: no
    permuted q/k/v, no transposed copy of the output, d(qkv) written directly (no stack of dq, dk, dv)."""
    _require()
    B, T, H3 = qkv.shape
    if H3 % 3 or (H3 // 3) % heads:
        raise ValueError(f"qkv_attention: last dim {H3} is not 3 x a multiple of {heads} heads")
    if _half_inference(qkv):
        return _sdpa_qkv(qkv, int(heads), token_mask)
    return _QKVAttention.apply(qkv, int(heads), token_mask)


def _sdpa_qkv(qkv: torch.Tensor, heads: int, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """bf16/fp16 inference (see _half_inference): ATen's fused CPU attention on views of the packed qkv,
    with this op's semantics (key-padding mask; every row of an all-padding sequence outputs zeros)."""
    B, T, H3 = qkv.shape
    if token_mask is not None and tuple(token_mask.shape) != (B, T):  # no broadcasting: the C++ op's check
        raise RuntimeError("attention_qkv: token_mask must be [B, T]")
    H = H3 // 3
    q, k, v = qkv.view(B, T, 3, heads, H // heads).permute(2, 0, 3, 1, 4).unbind(0)
    keys = None if token_mask is None else token_mask.to(torch.bool)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if keys is None else keys[:, None, None, :])
    out = out.transpose(1, 2).reshape(B, T, H)
    return out if keys is None else out.masked_fill(~keys.any(-1)[:, None, None], 0.0)
