"""Fused Triton kernels for nasfast (installed as nasfast.kernels)."""
