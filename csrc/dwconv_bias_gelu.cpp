// Depthwise conv of odd width k along the sequence ("same" zero padding, pad tokens zeroed by
// token_mask) + bias + GELU, channels-last so every inner loop runs over contiguous H.
//   u[b,t,c] = bias[c] + sum_j w[c,j] * m[b,s] * x[b,s,c],  s = t + j - k/2;   y = gelu(u)
// Forward saves nothing extra. Backward works on (batch, block of TB positions) tiles: it
// recomputes u and du = dy * gelu'(u) for the tile plus a k/2 halo into a cache-resident buffer,
// then writes dx for the tile and accumulates dweight/dbias — one pass over x, dy and dx.
#include "common.h"

namespace nasfast {
namespace {

constexpr int64_t kTile = 64;  // positions per backward tile

template <typename T>
struct Conv {
  const T* x;   // [B, T, H]
  const T* wt;  // [k, H] (weight transposed)
  const T* b;   // [H]
  const bool* m;  // [B, T] or nullptr
  int64_t B, L, H, k;  // L = sequence length
  bool real(int64_t bi, int64_t s) const { return s >= 0 && s < L && (!m || m[bi * L + s]); }
  // pre-activation u for channels [d, d + n) of position t
  Vectorized<T> u(int64_t bi, int64_t t, int64_t d, int64_t n) const {
    using Vec = Vectorized<T>;
    Vec acc = Vec::loadu(b + d, n);
    const int64_t r = k / 2;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = t + j - r;
      if (real(bi, s))
        acc = at::vec::fmadd(Vec::loadu(wt + j * H + d, n), Vec::loadu(x + (bi * L + s) * H + d, n), acc);
    }
    return acc;
  }
};

template <typename T>
void fwd_kernel(const Conv<T>& cv, T* y) {
  const int64_t N = cv.B * cv.L, H = cv.H;
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(H * cv.k, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t bi = row / cv.L, t = row % cv.L;
      for (int64_t d = 0; d < H; d += lanes<T>()) {
        const int64_t n = part<T>(d, H);
        Gelu<T>::fwd(cv.u(bi, t, d, n)).store(y + row * H + d, n);
      }
    }
  });
}

template <typename T>
void bwd_kernel(const Conv<T>& cv, const T* g, T* dx, std::vector<double>& parts, const Chunks& ch) {
  using Vec = Vectorized<T>;
  const int64_t L = cv.L, H = cv.H, k = cv.k, r = k / 2;
  const int64_t tiles = (L + kTile - 1) / kTile;
  ch.run([&](int64_t c, int64_t i0, int64_t i1) {
    std::vector<T> du((kTile + 2 * r) * H), acc((k + 1) * H, T(0));  // acc: [dw as [k, H] | db]
    double* part_c = parts.data() + c * (k + 1) * H;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bi = item / tiles, t0 = (item % tiles) * kTile, t1 = std::min(L, t0 + kTile);
      const int64_t lo = std::max<int64_t>(0, t0 - r), hi = std::min(L, t1 + r);
      for (int64_t t = lo; t < hi; ++t) {  // du for the tile and its halo
        const T* gr = g + (bi * L + t) * H;
        T* dur = du.data() + (t - lo) * H;
        for (int64_t d = 0; d < H; d += lanes<T>()) {
          const int64_t n = part<T>(d, H);
          (Vec::loadu(gr + d, n) * Gelu<T>::deriv(cv.u(bi, t, d, n))).store(dur + d, n);
        }
      }
      for (int64_t t = t0; t < t1; ++t) {  // dbias, dweight: outputs t of this tile
        const T* dur = du.data() + (t - lo) * H;
        for (int64_t d = 0; d < H; d += lanes<T>()) {
          const int64_t n = part<T>(d, H);
          const Vec dv = Vec::loadu(dur + d, n);
          (Vec::loadu(acc.data() + k * H + d, n) + dv).store(acc.data() + k * H + d, n);
          for (int64_t j = 0; j < k; ++j) {
            const int64_t s = t + j - r;
            if (!cv.real(bi, s)) continue;
            T* aw = acc.data() + j * H + d;
            at::vec::fmadd(dv, Vec::loadu(cv.x + (bi * L + s) * H + d, n), Vec::loadu(aw, n)).store(aw, n);
          }
        }
      }
      for (int64_t s = t0; s < t1; ++s) {  // dx: inputs s of this tile
        T* dxr = dx + (bi * L + s) * H;
        if (cv.m && !cv.m[bi * L + s]) {
          std::fill(dxr, dxr + H, T(0));
          continue;
        }
        for (int64_t d = 0; d < H; d += lanes<T>()) {
          const int64_t n = part<T>(d, H);
          Vec a(T(0));
          for (int64_t j = 0; j < k; ++j) {
            const int64_t t = s - j + r;
            if (t >= 0 && t < L)
              a = at::vec::fmadd(Vec::loadu(cv.wt + j * H + d, n), Vec::loadu(du.data() + (t - lo) * H + d, n), a);
          }
          a.store(dxr + d, n);
        }
      }
      flush(part_c, acc.data(), (k + 1) * H);
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
           const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 3, "dwconv_bias_gelu: x must be [B, T, H]");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(2) && w.size(1) % 2 == 1,
              "dwconv_bias_gelu: weight must be [H, k] with k odd");
  TORCH_CHECK(b.numel() == x.size(2), "dwconv_bias_gelu: bias must be [H]");
  if (mask.has_value() && mask->defined())
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == x.size(0) && mask->size(1) == x.size(1),
                "dwconv_bias_gelu: token_mask must be [B, T]");
}

template <typename T>
Conv<T> make_conv(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& m) {
  return Conv<T>{x.const_data_ptr<T>(), wt.const_data_ptr<T>(), b.const_data_ptr<T>(),
                 m.defined() ? m.const_data_ptr<bool>() : nullptr,
                 x.size(0), x.size(1), x.size(2), wt.size(0)};
}

at::Tensor mask_of(const std::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? mask->to(at::kBool).contiguous() : at::Tensor();
}

at::Tensor fwd(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_,
               const std::optional<at::Tensor>& mask_) {
  check(x_, w_, b_, mask_);
  const at::Tensor x = x_.contiguous(), wt = w_.t().contiguous(), b = b_.contiguous(), m = mask_of(mask_);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bias_gelu_fwd", [&] {
    fwd_kernel<scalar_t>(make_conv<scalar_t>(x, wt, b, m), y.data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g_, const at::Tensor& x_,
                                                   const at::Tensor& w_, const at::Tensor& b_,
                                                   const std::optional<at::Tensor>& mask_) {
  check(x_, w_, b_, mask_);
  const at::Tensor g = g_.contiguous(), x = x_.contiguous(), wt = w_.t().contiguous(),
                   b = b_.contiguous(), m = mask_of(mask_);
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), k = w_.size(1);
  at::Tensor dx = at::empty_like(x);
  const Chunks ch(B * ((L + kTile - 1) / kTile), 1);
  std::vector<double> parts(ch.count * (k + 1) * H, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_bias_gelu_bwd", [&] {
    bwd_kernel<scalar_t>(make_conv<scalar_t>(x, wt, b, m), g.const_data_ptr<scalar_t>(),
                         dx.data_ptr<scalar_t>(), parts, ch);
  });
  at::Tensor both = sum_partials(parts, ch.count, (k + 1) * H, w_.options());
  // fresh tensors, not views into `both` (a storage offset would contradict the op's fake)
  return {dx, both.narrow(0, 0, k * H).view({k, H}).t().contiguous(),
          both.narrow(0, k * H, H).view(b_.sizes()).clone()};
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("dwconv_bias_gelu_fwd", &nasfast::fwd);
  m.impl("dwconv_bias_gelu_bwd", &nasfast::bwd);
}
