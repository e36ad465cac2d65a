// bias + exact GELU. Forward: one pass x -> gelu(x + b). Backward recomputes u = x + b (nothing
// saved but the inputs) and produces dx and dbias in one pass; dbias is a deterministic chunked
// column sum (fp32/fp64 block sums flushed into double partials).
#include "common.h"

namespace nasfast {
namespace {

constexpr int64_t kGrainElems = 16384;  // elements per parallel task, small inputs stay serial

template <typename T>
void fwd_kernel(const T* x, const T* b, T* y, int64_t N, int64_t D) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      T* yr = y + r * D;
      for (int64_t d = 0; d < D; d += lanes<T>()) {
        const int64_t n = part<T>(d, D);
        const Vec u = Vec::loadu(xr + d, n) + Vec::loadu(b + d, n);
        Gelu<T>::fwd(u).store(yr + d, n);
      }
    }
  });
}

template <typename T>
void bwd_kernel(const T* g, const T* x, const T* b, T* dx, std::vector<double>& parts,
                const Chunks& ch, int64_t D) {
  using Vec = Vectorized<T>;
  ch.run([&](int64_t c, int64_t r0, int64_t r1) {
    std::vector<T> acc(D, T(0));
    double* part_c = parts.data() + c * D;
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = g + r * D;
      const T* xr = x + r * D;
      T* dxr = dx + r * D;
      for (int64_t d = 0; d < D; d += lanes<T>()) {
        const int64_t n = part<T>(d, D);
        const Vec u = Vec::loadu(xr + d, n) + Vec::loadu(b + d, n);
        const Vec du = Vec::loadu(gr + d, n) * Gelu<T>::deriv(u);
        du.store(dxr + d, n);
        (Vec::loadu(acc.data() + d, n) + du).store(acc.data() + d, n);
      }
      if ((r - r0 + 1) % kFlushRows == 0) flush(part_c, acc.data(), D);
    }
    flush(part_c, acc.data(), D);
  });
}

// bf16/fp16 rows widened into fp32 scratch, the fp32 GELU, narrowed back (inference: MAGIC-A's bf16
// anchor). ATen's own bf16 add + GELU take two passes and its slower erf.
template <typename In>
void fwd_half_kernel(const In* x, const float* b, In* y, int64_t N, int64_t D) {
  using Vec = Vectorized<float>;
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1)),
                   [&](int64_t r0, int64_t r1) {
    std::vector<float> u(D);
    for (int64_t r = r0; r < r1; ++r) {
      at::vec::convert(x + r * D, u.data(), D);
      for (int64_t d = 0; d < D; d += lanes<float>()) {
        const int64_t n = part<float>(d, D);
        Gelu<float>::fwd(Vec::loadu(u.data() + d, n) + Vec::loadu(b + d, n)).store(u.data() + d, n);
      }
      at::vec::convert(u.data(), y + r * D, D);
    }
  });
}

at::Tensor bias_gelu_fwd_half(const at::Tensor& x_, const at::Tensor& bias_) {
  TORCH_CHECK(x_.dim() >= 1 && bias_.dim() == 1 && bias_.size(0) == x_.size(-1),
              "bias_gelu: bias must be [D] with D = x.shape[-1]");
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 || x_.scalar_type() == at::kHalf,
              "bias_gelu_fwd_half: x must be bf16 or fp16");
  const at::Tensor x = x_.contiguous(), bias = bias_.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t D = x.size(-1), N = D == 0 ? 0 : x.numel() / D;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "bias_gelu_fwd_half", [&] {
    fwd_half_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), bias.const_data_ptr<float>(),
                              y.data_ptr<scalar_t>(), N, D);
  });
  return y;
}

at::Tensor bias_gelu_fwd(const at::Tensor& x_, const at::Tensor& bias_) {
  TORCH_CHECK(x_.dim() >= 1 && bias_.dim() == 1 && bias_.size(0) == x_.size(-1),
              "bias_gelu: bias must be [D] with D = x.shape[-1]");
  TORCH_CHECK(x_.scalar_type() == bias_.scalar_type(), "bias_gelu: x and bias dtypes differ");
  const at::Tensor x = x_.contiguous(), bias = bias_.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t D = x.size(-1), N = D == 0 ? 0 : x.numel() / D;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_gelu_fwd", [&] {
    fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                         y.data_ptr<scalar_t>(), N, D);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& grad_, const at::Tensor& x_,
                                                 const at::Tensor& bias_) {
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "bias_gelu_bwd: grad and x shapes differ");
  const at::Tensor g = grad_.contiguous(), x = x_.contiguous(), bias = bias_.contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t D = x.size(-1), N = D == 0 ? 0 : x.numel() / D;
  const Chunks ch(N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1)));
  std::vector<double> parts(ch.count * D, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_gelu_bwd", [&] {
    bwd_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                         bias.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), parts, ch, D);
  });
  return {dx, sum_partials(parts, ch.count, D, bias.options())};
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("bias_gelu_fwd", &nasfast::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &nasfast::bias_gelu_bwd);
  m.impl("bias_gelu_fwd_half", &nasfast::bias_gelu_fwd_half);
}
