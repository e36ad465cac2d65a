// Softmax cross-entropy of logits [M, V] against class indices [M]: loss = mean_i (lse_i - x_i[t_i]).
// Forward: per row a max pass and an exp-sum pass (the row, V = 8192 fp32 = 32 KB, stays in L1/L2),
// saves lse [M]; the mean is a double sum of the per-row losses in row order (deterministic for any
// thread count). Backward: d logits = (exp(x - lse) - onehot(t)) * grad / M in one read-write pass.
// Eager's log_softmax + nll_loss write the [M, V] log-probabilities, zero-fill and scatter a [M, V]
// gradient and read both again in log_softmax's backward.
#include "common.h"

namespace nasfast {
namespace {

constexpr int64_t kGrainElems = 16384;

void check_inputs(const char* who, const at::Tensor& x, const at::Tensor& t) {
  TORCH_CHECK(x.dim() == 2, who, ": logits must be [M, V], got ", x.dim(), " dims");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), who, ": targets must be [M] with M = logits.shape[0]");
  TORCH_CHECK(t.scalar_type() == at::kLong, who, ": targets must be int64 class indices");
  TORCH_CHECK(x.size(1) > 0 || x.size(0) == 0, who, ": logits have no classes (V = 0)");
  if (t.numel()) {
    const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < x.size(1), who, ": target ", lo < 0 ? lo : hi, " is out of bounds for ",
                x.size(1), " classes");
  }
}

template <typename T>
void fwd_kernel(const T* x, const int64_t* t, T* lse, double* row_loss, int64_t M, int64_t V) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, M, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * V;
      Vec mx(-std::numeric_limits<T>::infinity());
      for (int64_t d = 0; d < V; d += lanes<T>()) {
        const int64_t n = part<T>(d, V);
        const Vec v = Vec::loadu(xr + d, n);
        mx = at::vec::maximum(mx, n == lanes<T>() ? v : Vec::set(mx, v, n));
      }
      const T m = hmax<T>(mx);
      Vec sum(T(0));
      for (int64_t d = 0; d < V; d += lanes<T>()) {
        const int64_t n = part<T>(d, V);
        const Vec e = (Vec::loadu(xr + d, n) - Vec(m)).exp();
        sum = sum + (n == lanes<T>() ? e : Vec::set(Vec(T(0)), e, n));
      }
      // an infinite max (inf logits) makes lse inf or NaN, as eager's log_softmax does
      lse[r] = m + std::log(hsum<T>(sum));
      row_loss[r] = static_cast<double>(lse[r]) - static_cast<double>(xr[t[r]]);
    }
  });
}

template <typename T>
void bwd_kernel(const T* x, const int64_t* t, const T* lse, T scale, T* dx, int64_t M, int64_t V) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, M, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * V;
      T* dr = dx + r * V;
      const Vec l(lse[r]), s(scale);
      for (int64_t d = 0; d < V; d += lanes<T>()) {
        const int64_t n = part<T>(d, V);
        ((Vec::loadu(xr + d, n) - l).exp() * s).store(dr + d, n);
      }
      dr[t[r]] -= scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& logits_, const at::Tensor& targets_) {
  check_inputs("cross_entropy", logits_, targets_);
  const at::Tensor x = logits_.contiguous(), t = targets_.contiguous();
  const int64_t M = x.size(0), V = x.size(1);
  at::Tensor lse = at::empty({M}, x.options());
  std::vector<double> row_loss(M);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cross_entropy_fwd", [&] {
    fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
                         row_loss.data(), M, V);
  });
  double total = 0.0;
  for (double v : row_loss) total += v;
  // M == 0 (no masked token in the batch): 0, not eager's 0 / 0 = NaN (as the reference)
  return {at::scalar_tensor(M ? total / static_cast<double>(M) : 0.0, x.options()), lse};
}

at::Tensor bwd(const at::Tensor& grad, const at::Tensor& logits_, const at::Tensor& targets_,
               const at::Tensor& lse_) {
  check_inputs("cross_entropy_bwd", logits_, targets_);
  TORCH_CHECK(grad.numel() == 1, "cross_entropy_bwd: grad must be a scalar");
  TORCH_CHECK(lse_.dim() == 1 && lse_.size(0) == logits_.size(0), "cross_entropy_bwd: lse must be [M]");
  const at::Tensor x = logits_.contiguous(), t = targets_.contiguous(), lse = lse_.contiguous();
  const int64_t M = x.size(0), V = x.size(1);
  at::Tensor dx = at::empty_like(x);
  if (M == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cross_entropy_bwd", [&] {
    const scalar_t scale = grad.item<scalar_t>() / static_cast<scalar_t>(M);
    bwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                         lse.const_data_ptr<scalar_t>(), scale, dx.data_ptr<scalar_t>(), M, V);
  });
  return dx;
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("cross_entropy_fwd", &nasfast::fwd);
  m.impl("cross_entropy_bwd", &nasfast::bwd);
}
