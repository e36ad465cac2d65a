// Inverted dropout y = x * keep / (1 - p) over x viewed as [rows, last dim], with the keep pattern
// of add_dropout_layernorm: keep_mask (bool, x's shape) or the counter hash of (seed, row, col).
// The backward is the same map applied to the gradient (same seed, same pattern): nothing is saved
// and no random numbers are drawn per element (torch's bernoulli_ costs ~6 ns per element on CPU).
#include "common.h"

namespace nasfast {
namespace {

constexpr int64_t kGrainElems = 16384;

template <typename T>
void kernel(const T* x, T* y, const bool* mask, const DropoutHash& hash, double p, int64_t N, int64_t H) {
  using Vec = Vectorized<T>;
  const T scale = static_cast<T>(1.0 / (1.0 - p));
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<T> fac(H);
    for (int64_t r = r0; r < r1; ++r) {
      if (mask) {
        const bool* mr = mask + r * H;
        for (int64_t c = 0; c < H; ++c) fac[c] = mr[c] ? scale : T(0);
      } else {
        hash.row_factors<T>(r, H, scale, fac.data());
      }
      const T* xr = x + r * H;
      T* yr = y + r * H;
      for (int64_t d = 0; d < H; d += lanes<T>()) {
        const int64_t n = part<T>(d, H);
        (Vec::loadu(xr + d, n) * Vec::loadu(fac.data() + d, n)).store(yr + d, n);
      }
    }
  });
}

at::Tensor dropout_apply(const at::Tensor& x_, double p, const std::optional<at::Tensor>& keep_mask, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  const at::Tensor x = x_.dim() == 0 ? x_.reshape({1}) : x_.contiguous();
  at::Tensor mask;
  if (keep_mask.has_value() && keep_mask->defined()) {
    TORCH_CHECK(keep_mask->sizes() == x_.sizes(), "dropout: keep_mask must have x's shape");
    mask = keep_mask->to(at::kBool).contiguous();
  }
  at::Tensor y = at::empty_like(x);
  const int64_t H = x.size(-1), N = H == 0 ? 0 : x.numel() / H;
  if (N > 0) {
    const DropoutHash hash(seed, p);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_apply", [&] {
      kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                       mask.defined() ? mask.const_data_ptr<bool>() : nullptr, hash, p, N, H);
    });
  }
  return x_.dim() == 0 ? y.reshape({}) : y;
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("dropout_apply", &nasfast::dropout_apply);
}
