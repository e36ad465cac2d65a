"""Small helpers shared by the Triton kernel files (dtype mapping, block sizes, backend probe)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Custom-op namespace of the Triton kernels (the C++ ops own ``nasfast``).
NAMESPACE = "nasfast_triton"

_ACC = {torch.float64: tl.float64}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_type(*tensors: torch.Tensor):
    """Accumulation dtype for a kernel: fp64 if any input is fp64 (gradcheck), else fp32."""
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def acc_torch_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if acc_type(*tensors) == tl.float64 else torch.float32


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def row_block(n_rows: int, width: int, budget: int) -> int:
    """Rows per program so that one tile holds about ``budget`` elements.

    Under the interpreter each program instance costs ~1 ms, so tiles are made as large as the
    budget allows; on a GPU the budget keeps registers in check.
    """
    return max(1, min(pow2(n_rows), pow2(max(1, budget // max(1, width)))))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what eager matmul does for ``dtype``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def check_available() -> str:
    """Empty string when Triton kernels can run here, else the reason they cannot."""
    if interpreting():
        return ""
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    return ""


def num_programs_target(device: torch.device) -> int:
    """How many programs a persistent-style reduction grid should aim for on ``device``."""
    if device.type != "cuda":
        return 1  # interpreter: every program instance costs ~1 ms
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def tile_budget() -> int:
    """Elements per program tile: small on a GPU (registers), large under the interpreter."""
    return 1 << 16 if interpreting() else 4096


@triton.jit
def gelu(z):
    """Exact (erf) GELU, in the dtype of ``z``."""
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def gelu_grad(z):
    """d gelu(z) / dz = Phi(z) + z * phi(z)."""
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return cdf + z * pdf
