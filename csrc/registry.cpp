// Schemas of every nasfast:: op. Implementations live one file per fused op and register with
// TORCH_LIBRARY_IMPL(nasfast, CPU, ...). Autograd is wired in Python (nasfast/native.py).
#include "common.h"

namespace nasfast {
at::Tensor dropout_keep_mask(int64_t rows, int64_t cols, double p, int64_t seed);
}

TORCH_LIBRARY(nasfast, m) {
  // bias + exact GELU over the last dim. x [N.., D], bias [D].
  m.def("bias_gelu_fwd(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor grad, Tensor x, Tensor bias) -> (Tensor, Tensor)");
  // bf16/fp16 x, any-dtype bias, fp32 math, output in x's dtype (inference only)
  m.def("bias_gelu_fwd_half(Tensor x, Tensor bias) -> Tensor");
  // LayerNorm(residual + dropout(x)). Dropout keeps where keep_mask (bool, x's shape) is true, or,
  // without a mask and p > 0, where a counter hash of (seed, row, col) passes; p == 0: no dropout.
  m.def("add_dropout_layernorm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, float p, "
        "Tensor? keep_mask, int seed, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_dropout_layernorm_bwd(Tensor grad, Tensor x, Tensor residual, Tensor weight, "
        "Tensor mean, Tensor rstd, float p, Tensor? keep_mask, int seed) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // the same forward for bf16/fp16 x, residual x's dtype or fp32 (output: residual's dtype); fp32
  // weight, bias and math; output only (inference)
  m.def("add_dropout_layernorm_fwd_half(Tensor x, Tensor residual, Tensor weight, Tensor bias, float p, "
        "Tensor? keep_mask, int seed, float eps) -> Tensor");
  // x * keep / (1 - p), keep from keep_mask or the same counter hash; also its own backward.
  m.def("dropout_apply(Tensor x, float p, Tensor? keep_mask, int seed) -> Tensor");
  // The dropout keep pattern the fused op uses for (shape, p, seed), as a bool tensor (tests).
  m.def("dropout_keep_mask(int rows, int cols, float p, int seed) -> Tensor",
        &nasfast::dropout_keep_mask);
  // depthwise conv (odd width k, "same" zero padding, pad tokens zeroed) + bias + GELU.
  m.def("dwconv_bias_gelu_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? token_mask) -> Tensor");
  m.def("dwconv_bias_gelu_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias, "
        "Tensor? token_mask) -> (Tensor, Tensor, Tensor)");
  // softmax attention with key-padding mask; returns (out, logsumexp per query row).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? token_mask) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? token_mask) -> (Tensor, Tensor, Tensor)");
  // the same attention on a packed qkv [B, T, 3H] (q | k | v, `heads` heads each): out [B, T, H],
  // lse [B, heads, T]; backward returns d(qkv) [B, T, 3H] (no per-tensor transposes or stacking).
  m.def("attention_qkv_fwd(Tensor qkv, int heads, Tensor? token_mask) -> (Tensor, Tensor)");
  m.def("attention_qkv_bwd(Tensor grad, Tensor qkv, int heads, Tensor? token_mask) -> Tensor");
  // sum_l mean over real tokens x H of (h_l - a_l)^2, and (if need_grad) d loss / d h_l.
  m.def("alignment_loss_fwd(Tensor[] child, Tensor[] anchor, Tensor? token_mask, bool need_grad) "
        "-> (Tensor, Tensor[])");
  // softmax cross-entropy, mean over rows: logits [M, V], int64 targets [M] -> (loss [], lse [M]);
  // backward returns d logits for a scalar grad.
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor lse) -> Tensor");
  m.def("gemm_backend() -> str", &nasfast::gemm_backend_name);
}
