// Inverted dropout y = x * keep / (1 - p) over x viewed as [rows, last dim], with the keep pattern
// of add_dropout_layernorm: keep_mask (bool, x's shape) or the counter hash of (seed, row, col).
// The backward is the same map applied to the gradient (same seed, same pattern): nothing is saved
// and no random numbers are drawn per element (torch's bernoulli_ costs ~6 ns per element on CPU).
#include "common.h"

namespace nasfast {
namespace {

constexpr int64_t kGrainElems = 16384;

template <typename T>
void kernel(const T* x, T* y, const Dropout& drop, int64_t N, int64_t H) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<T> fac(H);
    for (int64_t r = r0; r < r1; ++r) {
      drop.factors<T>(r, H, fac.data());
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
  const at::Tensor x = x_.dim() == 0 ? x_.reshape({1}) : x_.contiguous();
  at::Tensor mask_holder;
  const Dropout drop = make_dropout("dropout", p, keep_mask, seed, x_, mask_holder);
  at::Tensor y = at::empty_like(x);
  const int64_t H = x.size(-1), N = H == 0 ? 0 : x.numel() / H;
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_apply", [&] {
      kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), drop, N, H);
    });
  }
  return x_.dim() == 0 ? y.reshape({}) : y;
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("dropout_apply", &nasfast::dropout_apply);
}
