"""The ``triton`` backend: fused ops with the signatures of ``nasfast.kernels.reference``.

Each op is a ``torch.ops.nasfast_triton.*_fwd`` custom op (opaque to ``torch.compile``) whose autograd
formula (``register_autograd``) calls the matching ``*_bwd`` op. Runs on CUDA, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was first imported (tests). Outputs and gradients are
always freshly allocated contiguous tensors, whatever the strides of the inputs.
"""
from __future__ import annotations

from nasfast.kernels._common import check_available
from nasfast.kernels.alignment import alignment_loss
from nasfast.kernels.attention import attention
from nasfast.kernels.bias_gelu import bias_gelu
from nasfast.kernels.dwconv import dwconv_bias_gelu
from nasfast.kernels.layernorm import add_dropout_layernorm

__all__ = ["bias_gelu", "add_dropout_layernorm", "dwconv_bias_gelu", "attention", "alignment_loss",
           "available", "why_unavailable"]


def why_unavailable() -> str:
    """Empty when the kernels can run in this process, else the reason."""
    return check_available()


def available() -> bool:
    return not why_unavailable()
