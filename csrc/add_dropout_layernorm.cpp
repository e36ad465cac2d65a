// Post-LN sub-layer tail: y = LayerNorm(residual + dropout(x)) over the last dim H.
// Forward: one pass per row (z = residual + x * keep / (1 - p) kept in the output row while the
// two-pass mean/variance runs in cache), saves mean and rstd. Backward recomputes z from x,
// residual and the keep pattern (regenerated from the seed, or read from keep_mask), so the only
// saved activations are the inputs autograd keeps anyway; dx, dresidual, dweight, dbias in one pass.
// A bf16/fp16 forward for inference (fp32 math per row, no statistics saved) serves MAGIC-A's bf16 anchor.
#include "common.h"

namespace nasfast {
namespace {

constexpr int64_t kGrainElems = 16384;

// z = residual + x * fac (fac == nullptr: no dropout) into z.
template <typename T>
inline void residual_row(const T* xr, const T* rr, const T* fac, T* z, int64_t H) {
  using Vec = Vectorized<T>;
  for (int64_t d = 0; d < H; d += lanes<T>()) {
    const int64_t n = part<T>(d, H);
    Vec v = Vec::loadu(xr + d, n);
    if (fac) v = v * Vec::loadu(fac + d, n);
    (Vec::loadu(rr + d, n) + v).store(z + d, n);
  }
}

// One row in place: z = LayerNorm(z) (two-pass mean/variance, z in cache); returns mean and rstd.
template <typename T>
inline void normalize_row(T* z, const T* w, const T* b, int64_t H, double eps, T& mean, T& rstd) {
  using Vec = Vectorized<T>;
  Vec s(T(0));
  for (int64_t d = 0; d < H; d += lanes<T>()) s = s + Vec::loadu(z + d, part<T>(d, H));
  const T mu = hsum<T>(s) / static_cast<T>(H);
  Vec q(T(0));
  for (int64_t d = 0; d < H; d += lanes<T>()) {
    const int64_t n = part<T>(d, H);
    const Vec c = Vec::loadu(z + d, n) - Vec(mu);
    q = q + (n == lanes<T>() ? c * c : Vec::set(Vec(T(0)), c * c, n));
  }
  const T rs = T(1) / std::sqrt(hsum<T>(q) / static_cast<T>(H) + static_cast<T>(eps));
  for (int64_t d = 0; d < H; d += lanes<T>()) {
    const int64_t n = part<T>(d, H);
    const Vec xhat = (Vec::loadu(z + d, n) - Vec(mu)) * Vec(rs);
    at::vec::fmadd(xhat, Vec::loadu(w + d, n), Vec::loadu(b + d, n)).store(z + d, n);
  }
  mean = mu;
  rstd = rs;
}

template <typename T>
void fwd_kernel(const T* x, const T* res, const T* w, const T* b, T* y, T* mean, T* rstd,
                int64_t N, int64_t H, double eps, const Dropout& drop) {
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1)),
                   [&](int64_t r0, int64_t r1) {
    std::vector<T> fac(drop.active() ? H : 0);
    for (int64_t r = r0; r < r1; ++r) {
      T* z = y + r * H;
      if (drop.active()) drop.factors<T>(r, H, fac.data());
      residual_row<T>(x + r * H, res + r * H, drop.active() ? fac.data() : nullptr, z, H);
      normalize_row<T>(z, w, b, H, eps, mean[r], rstd[r]);
    }
  });
}

// bf16/fp16 x, a residual (and output) of x's dtype or fp32, fp32 weight and math (inference:
// nothing saved). Each row is widened into fp32 scratch, run through the fp32 row code with the same
// keep pattern, and narrowed (or not) on the way out.
template <typename In, typename Res>
void fwd_half_kernel(const In* x, const Res* res, const float* w, const float* b, Res* y, int64_t N,
                     int64_t H, double eps, const Dropout& drop) {
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1)),
                   [&](int64_t r0, int64_t r1) {
    std::vector<float> xf(H), rf(H), z(H), fac(drop.active() ? H : 0);
    float mu, rs;
    for (int64_t r = r0; r < r1; ++r) {
      at::vec::convert(x + r * H, xf.data(), H);
      at::vec::convert(res + r * H, rf.data(), H);
      if (drop.active()) drop.factors<float>(r, H, fac.data());
      residual_row<float>(xf.data(), rf.data(), drop.active() ? fac.data() : nullptr, z.data(), H);
      normalize_row<float>(z.data(), w, b, H, eps, mu, rs);
      at::vec::convert(z.data(), y + r * H, H);
    }
  });
}

template <typename T>
void bwd_kernel(const T* g, const T* x, const T* res, const T* w, const T* mean, const T* rstd,
                T* dx, T* dres, std::vector<double>& parts, const Chunks& ch, int64_t H,
                const Dropout& drop) {
  using Vec = Vectorized<T>;
  ch.run([&](int64_t c, int64_t r0, int64_t r1) {
    std::vector<T> fac(drop.active() ? H : 0), xhat(H), acc(2 * H, T(0));  // acc: [dw | db]
    double* part_c = parts.data() + c * 2 * H;
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = g + r * H;
      if (drop.active()) drop.factors<T>(r, H, fac.data());
      residual_row<T>(x + r * H, res + r * H, drop.active() ? fac.data() : nullptr, xhat.data(), H);
      const Vec mu(mean[r]), rs(rstd[r]);
      Vec s1(T(0)), s2(T(0));
      for (int64_t d = 0; d < H; d += lanes<T>()) {
        const int64_t n = part<T>(d, H);
        const Vec xh = (Vec::loadu(xhat.data() + d, n) - mu) * rs;  // padded lanes: gv = gw = 0
        xh.store(xhat.data() + d, n);
        const Vec gv = Vec::loadu(gr + d, n);
        const Vec gw = gv * Vec::loadu(w + d, n);
        s1 = s1 + gw;
        s2 = s2 + gw * xh;
        (Vec::loadu(acc.data() + d, n) + gv * xh).store(acc.data() + d, n);
        (Vec::loadu(acc.data() + H + d, n) + gv).store(acc.data() + H + d, n);
      }
      const Vec c1(hsum<T>(s1) / static_cast<T>(H)), c2(hsum<T>(s2) / static_cast<T>(H));
      T* dxr = dx + r * H;
      T* drr = dres + r * H;
      for (int64_t d = 0; d < H; d += lanes<T>()) {
        const int64_t n = part<T>(d, H);
        const Vec gw = Vec::loadu(gr + d, n) * Vec::loadu(w + d, n);
        const Vec dz = rs * (gw - c1 - Vec::loadu(xhat.data() + d, n) * c2);
        dz.store(drr + d, n);
        (drop.active() ? dz * Vec::loadu(fac.data() + d, n) : dz).store(dxr + d, n);
      }
      if ((r - r0 + 1) % kFlushRows == 0) flush(part_c, acc.data(), 2 * H);
    }
    flush(part_c, acc.data(), 2 * H);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x_, const at::Tensor& res_,
                                                   const at::Tensor& w_, const at::Tensor& b_,
                                                   double p, const std::optional<at::Tensor>& keep_mask,
                                                   int64_t seed, double eps) {
  TORCH_CHECK(x_.sizes() == res_.sizes(), "add_dropout_layernorm: x and residual shapes differ");
  const int64_t H = x_.size(-1), N = H == 0 ? 0 : x_.numel() / H;
  TORCH_CHECK(w_.numel() == H && b_.numel() == H, "add_dropout_layernorm: weight/bias must be [H]");
  const at::Tensor x = x_.contiguous(), res = res_.contiguous(), w = w_.contiguous(), b = b_.contiguous();
  at::Tensor mask_holder;
  const Dropout drop = make_dropout("add_dropout_layernorm", p, keep_mask, seed, x, mask_holder);
  at::Tensor y = at::empty_like(x), mean = at::empty({N}, x.options()), rstd = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_dropout_layernorm_fwd", [&] {
    fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(),
                         w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                         y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                         N, H, eps, drop);
  });
  return {y, mean, rstd};
}

at::Tensor fwd_half(const at::Tensor& x_, const at::Tensor& res_, const at::Tensor& w_, const at::Tensor& b_,
                    double p, const std::optional<at::Tensor>& keep_mask, int64_t seed, double eps) {
  TORCH_CHECK(x_.sizes() == res_.sizes(), "add_dropout_layernorm: x and residual shapes differ");
  TORCH_CHECK((x_.scalar_type() == at::kBFloat16 || x_.scalar_type() == at::kHalf) &&
                  (res_.scalar_type() == x_.scalar_type() || res_.scalar_type() == at::kFloat),
              "add_dropout_layernorm_fwd_half: x must be bf16 or fp16, residual x's dtype or fp32");
  const int64_t H = x_.size(-1), N = H == 0 ? 0 : x_.numel() / H;
  TORCH_CHECK(w_.numel() == H && b_.numel() == H, "add_dropout_layernorm: weight/bias must be [H]");
  const at::Tensor x = x_.contiguous(), res = res_.contiguous();
  const at::Tensor w = w_.to(at::kFloat).contiguous(), b = b_.to(at::kFloat).contiguous();
  at::Tensor mask_holder;
  const Dropout drop = make_dropout("add_dropout_layernorm", p, keep_mask, seed, x, mask_holder);
  at::Tensor y = at::empty_like(res);  // the promoted dtype, as the reference's residual + x
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "add_dropout_layernorm_fwd_half", [&] {
    if (res.scalar_type() == at::kFloat) {
      fwd_half_kernel<scalar_t, float>(x.const_data_ptr<scalar_t>(), res.const_data_ptr<float>(),
                                       w.const_data_ptr<float>(), b.const_data_ptr<float>(), y.data_ptr<float>(),
                                       N, H, eps, drop);
    } else {
      fwd_half_kernel<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(),
                                          w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                          y.data_ptr<scalar_t>(), N, H, eps, drop);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& res_, const at::Tensor& w_,
    const at::Tensor& mean_, const at::Tensor& rstd_, double p,
    const std::optional<at::Tensor>& keep_mask, int64_t seed) {
  const int64_t H = x_.size(-1), N = H == 0 ? 0 : x_.numel() / H;
  const at::Tensor g = g_.contiguous(), x = x_.contiguous(), res = res_.contiguous(),
                   w = w_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor mask_holder;
  const Dropout drop = make_dropout("add_dropout_layernorm", p, keep_mask, seed, x, mask_holder);
  at::Tensor dx = at::empty_like(x), dres = at::empty_like(x);
  const Chunks ch(N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(H, 1)));
  std::vector<double> parts(ch.count * 2 * H, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_dropout_layernorm_bwd", [&] {
    bwd_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                         res.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                         mean.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(),
                         dx.data_ptr<scalar_t>(), dres.data_ptr<scalar_t>(), parts, ch, H, drop);
  });
  at::Tensor both = sum_partials(parts, ch.count, 2 * H, w.options());
  // dbias is cloned, not a view into `both` (a storage offset would contradict the op's fake)
  return {dx, dres, both.narrow(0, 0, H).view(w_.sizes()), both.narrow(0, H, H).view(w_.sizes()).clone()};
}

}  // namespace

at::Tensor dropout_keep_mask(int64_t rows, int64_t cols, double p, int64_t seed) {
  const DropoutHash hash(seed, p);
  at::Tensor out = at::empty({rows, cols}, at::kBool);
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> fac(cols);
    for (int64_t r = r0; r < r1; ++r) {
      hash.row_factors<float>(r, cols, 1.0f, fac.data());
      for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = fac[c] != 0.0f;
    }
  });
  return out;
}

}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("add_dropout_layernorm_fwd", &nasfast::fwd);
  m.impl("add_dropout_layernorm_bwd", &nasfast::bwd);
  m.impl("add_dropout_layernorm_fwd_half", &nasfast::fwd_half);
}
