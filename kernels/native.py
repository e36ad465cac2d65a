"""C++ CPU backend: the fused ops of ``nasfast.kernels.reference`` as ``torch.ops.nasfast.*``.

The sources in ``csrc/`` are JIT-built once per machine with ``torch.utils.cpp_extension.load``
(ninja) into a cache directory, on first use (``available()`` or the first op call), not at import.
Where there is no compiler or the build fails, ``available()`` is False and ``why_unavailable()``
says why; ``nasfast.kernels.registry`` then falls back to eager.

Environment:
- ``NASFAST_CSRC``: the C++ sources (default ``nasfast/csrc``: the checkout's ``csrc/`` or the wheel's copy).
- ``NASFAST_BUILD_DIR``: build cache (default ``$TORCH_EXTENSIONS_DIR/nasfast`` if set, else
  ``~/.cache/nasfast``), one sub-directory per torch version / CPU capability / source content.
- ``NASFAST_NATIVE_ARCH=avx2|default``: build for at most that ISA (default: the widest torch uses here,
  AVX512, AVX2+FMA or portable).
- ``NASFAST_NATIVE_VERBOSE=1``: show the compiler output.
- ``NASFAST_NATIVE_GEMM=aten``: attention GEMMs through ATen instead of the BLAS in libtorch_cpu.

Layout: build/load helpers, then one thin ``torch.autograd.Function`` per op (forward/backward only
call ``torch.ops.nasfast.*`` and save tensors), then the functions with the reference
signatures (``linear`` is ATen's GEMMs with a GEMV bias gradient, no C++ of its own). fp32 and
fp64 run natively; other floating dtypes are computed in fp32 and cast back, except bf16/fp16
inference in bias_gelu, qkv_attention and add_dropout_layernorm (see ``_half_inference``). Longer
than 400 lines because the backend is this one module (the registry reads its op functions by
name), and each of its nine ops needs its autograd.Function beside the function that calls it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

_LOCK = threading.Lock()
_STATE: dict = {"loaded": False, "error": None, "path": None}


# ------------------------------------------------------------------------------------ build/load
def _sources_dir() -> Path:
    """NASFAST_CSRC, else ``nasfast/csrc``: the top-level csrc/ in a checkout (through the link
    nasfast/csrc -> ../csrc), the copy shipped as package data in an installed wheel."""
    if os.environ.get("NASFAST_CSRC"):
        return Path(os.environ["NASFAST_CSRC"])
    return Path(__file__).resolve().parent.parent / "csrc"  # kernels/native.py -> csrc/ beside kernels/


_ARCH_FLAGS = {
    # the flags torch builds its own AVX512 / AVX2 kernels with, so at::vec picks the same code paths
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _arch() -> str:
    """The widest vector ISA torch itself uses on this CPU ('avx512', 'avx2'), else 'default'.

    ``NASFAST_NATIVE_ARCH`` (avx512 | avx2 | default) caps it: a build never uses more than the CPU has.
    """
    order = ["default", "avx2", "avx512"]
    found = "default"
    if platform.machine().lower() in ("x86_64", "amd64"):
        found = {"AVX2": "avx2", "AVX512": "avx512"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    cap = os.environ.get("NASFAST_NATIVE_ARCH", "").lower()
    if cap:
        if cap not in order:
            raise ValueError(f"NASFAST_NATIVE_ARCH must be one of {order}, got {cap!r}")
        found = order[min(order.index(found), order.index(cap))]
    return found


def _build_dir(arch: str, src: Path) -> Path:
    """One folder per (torch version, CPU capability, source content): two checkouts with different C++
    sources never rebuild over each other's extension, and the same sources always reuse one build."""
    root = os.environ.get("NASFAST_BUILD_DIR")
    if root is None:
        ext = os.environ.get("TORCH_EXTENSIONS_DIR")
        root = str(Path(ext) / "nasfast") if ext else str(Path.home() / ".cache" / "nasfast")
    digest = hashlib.sha1()
    for path in sorted([*src.glob("*.cpp"), *src.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"torch{torch.__version__.replace('+', '_')}-{arch}-{digest.hexdigest()[:10]}"
    return Path(root) / tag


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise builds with an OS file lock, which the kernel releases if its holder dies.

    torch's own build lock is a plain ``lock`` file: a build killed hard (SIGKILL, OOM, a closed
    terminal) leaves it behind, and every later process waits on it forever. Holding our lock proves
    no other nasfast build is running here, so such a file is stale and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: keep torch's behaviour
        yield
        return
    with open(build_dir / "nasfast.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stage_sources(src: Path, staged: Path) -> list[str]:
    """Copy the sources into the build folder and compile from there: the compiler commands then do
    not depend on where nasfast is installed, so a checkout and an installed wheel with the same
    sources share one build instead of rebuilding over each other. Unchanged files keep their mtime
    (ninja rebuilds on a newer source)."""
    staged.mkdir(exist_ok=True)
    for path in [*src.glob("*.cpp"), *src.glob("*.h")]:
        target = staged / path.name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            shutil.copy2(path, target)
    return sorted(str(p) for p in staged.glob("*.cpp"))


def _build() -> str:
    from torch.utils import cpp_extension

    src = _sources_dir()
    sources = sorted(str(p) for p in src.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"C++ sources not found in {src} (set NASFAST_CSRC to the csrc/ folder)")
    arch = _arch()
    cflags = ["-O3", "-fopenmp", "-Wno-c++20-extensions", "-Wno-unused-function", *_ARCH_FLAGS[arch]]
    build_dir = _build_dir(arch, src)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"nasfast_native_{arch}"
    with _build_lock(build_dir):
        sources = _stage_sources(src, build_dir / "src")
        # The first build on a machine takes minutes of silence otherwise: say when it starts and ends
        # (checked under the lock, so a process that waited for another's build says nothing).
        compiling = not (build_dir / f"{name}.so").exists()
        if compiling:
            print(f"nasfast: compiling the native C++ ops once for this machine ({arch}) into {build_dir}; "
                  f"this takes a few minutes", file=sys.stderr, flush=True)
            started = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],  # libgomp.so.1: the same soname torch's own runtime is loaded as
            extra_include_paths=[str(build_dir / "src")],
            build_directory=str(build_dir),
            is_python_module=False,  # plain TORCH_LIBRARY .so, loaded with torch.ops.load_library
            verbose=os.environ.get("NASFAST_NATIVE_VERBOSE") == "1",
        )
        if compiling:
            print(f"nasfast: native C++ ops built in {time.perf_counter() - started:.0f} s (cached for later runs)",
                  file=sys.stderr, flush=True)
    return str(build_dir)


def _ensure() -> bool:
    if _STATE["loaded"] or _STATE["error"] is not None:
        return _STATE["loaded"]
    with _LOCK:
        if not _STATE["loaded"] and _STATE["error"] is None:
            try:
                if hasattr(torch.ops, "nasfast") and hasattr(torch.ops.nasfast, "bias_gelu_fwd"):
                    _STATE["path"] = "already registered"
                else:
                    _STATE["path"] = _build()
                _register_fakes()
                _STATE["loaded"] = True
            except Exception as exc:  # no compiler, missing headers, failed link ...
                _STATE["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
    return _STATE["loaded"]


def _register_fakes() -> None:
    """Shape/dtype-only ("fake") versions of the C++ ops, for torch.compile / FakeTensor tracing.

    Every C++ op returns fresh contiguous tensors whatever its inputs' strides, so the fakes do too.
    (``dropout_keep_mask`` and ``gemm_backend`` are test/debug helpers defined with their function,
    i.e. CompositeImplicitAutograd, which torch does not let have a fake.)
    """
    lib = torch.library

    def once(name, fn):
        try:
            lib.register_fake(f"nasfast::{name}", fn)
        except RuntimeError as exc:  # another import path registered them in this process already
            if "already" not in str(exc):
                raise

    def new(t, shape=None, dtype=None):
        return t.new_empty(t.shape if shape is None else shape, dtype=dtype or t.dtype)

    def rows(x):
        return x.numel() // x.shape[-1] if x.shape[-1] else 0

    once("bias_gelu_fwd", lambda x, bias: new(x))
    once("dropout_apply", lambda x, p, keep_mask, seed: new(x))
    once("bias_gelu_bwd", lambda grad, x, bias: (new(x), new(bias, (x.shape[-1],))))
    once("add_dropout_layernorm_fwd",
         lambda x, residual, weight, bias, p, keep_mask, seed, eps: (new(x), new(x, (rows(x),)), new(x, (rows(x),))))
    once("add_dropout_layernorm_bwd",
         lambda grad, x, residual, weight, mean, rstd, p, keep_mask, seed: (new(x), new(x), new(weight), new(weight)))
    once("add_dropout_layernorm_fwd_half", lambda x, residual, weight, bias, p, keep_mask, seed, eps: new(residual))
    once("bias_gelu_fwd_half", lambda x, bias: new(x))
    once("dwconv_bias_gelu_fwd", lambda x, weight, bias, token_mask: new(x))
    once("dwconv_bias_gelu_bwd", lambda grad, x, weight, bias, token_mask: (new(x), new(weight), new(bias)))
    once("attention_fwd", lambda q, k, v, token_mask: (new(q), new(q, q.shape[:3])))
    once("attention_bwd", lambda grad, q, k, v, out, lse, token_mask: (new(q), new(k), new(v)))
    once("attention_qkv_fwd", lambda qkv, heads, token_mask: (
        new(qkv, (*qkv.shape[:2], qkv.shape[2] // 3)), new(qkv, (qkv.shape[0], heads, qkv.shape[1]))))
    once("attention_qkv_bwd", lambda grad, qkv, heads, token_mask: new(qkv))
    once("cross_entropy_fwd", lambda logits, targets: (new(logits, ()), new(logits, (logits.shape[0],))))
    once("cross_entropy_bwd", lambda grad, logits, targets, lse: new(logits))
    once("alignment_loss_fwd", lambda child, anchor, token_mask, need_grad: (
        new(child[0], ()), [new(c) for c in child] if need_grad else []))


def available() -> bool:
    """True when the C++ ops are built and loaded (builds them on the first call)."""
    return _ensure()


def why_unavailable() -> str:
    return "" if _ensure() else str(_STATE["error"])


def gemm_backend() -> str:
    """Which GEMM the fused attention uses: 'blas:sgemm_' (libtorch_cpu's BLAS) or 'aten'."""
    _require()
    return torch.ops.nasfast.gemm_backend()


def _require() -> None:
    if not _ensure():
        raise RuntimeError(f"nasfast native ops unavailable: {_STATE['error']}")


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
