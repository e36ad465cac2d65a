// Shared helpers for the nasfast C++ CPU ops: vector GELU, deterministic chunked reductions,
// counter-based dropout hash, and a row-major GEMM that calls the BLAS linked into libtorch_cpu.
//
// Compiled with torch's own AVX512 flags (-DCPU_CAPABILITY_AVX512 -mavx512f/bw/vl/dq -mfma) where
// torch runs AVX512 kernels, with -DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c where it runs AVX2 ones
// (see kernels/native.py; at::vec's fp16 conversions need F16C), otherwise with
// CPU_CAPABILITY=DEFAULT (at::vec's portable scalar fallback). Training kernels are templated on
// scalar_t in {float, double} (bf16/fp16 upcast in Python); the *_fwd_half inference forwards read
// bf16/fp16 and widen each row to fp32 in cache.
#pragma once

#if defined(CPU_CAPABILITY_AVX2)
// Call SLEEF's AVX2 exp directly rather than through its runtime-dispatch entry point.
#define Sleef_expf8_u10 Sleef_expf8_u10avx2
#elif defined(CPU_CAPABILITY_AVX512)
#define Sleef_expf16_u10 Sleef_expf16_u10avx512f
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace nasfast {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// GELU (exact, erf). Generic version uses at::vec's erf/exp (fp64: accurate to double precision).
template <typename T>
struct Gelu {
  using Vec = Vectorized<T>;
  static constexpr double kAlpha = M_SQRT1_2;                    // 1/sqrt(2)
  static constexpr double kBeta = M_2_SQRTPI * M_SQRT1_2 * 0.5;  // 1/sqrt(2*pi)

  static inline Vec fwd(const Vec& u) {
    return u * Vec(T(0.5)) * (Vec(T(1)) + (u * Vec(T(kAlpha))).erf());
  }
  // d gelu(u) / du = Phi(u) + u * phi(u)
  static inline Vec deriv(const Vec& u) {
    const Vec cdf = Vec(T(0.5)) * (Vec(T(1)) + (u * Vec(T(kAlpha))).erf());
    const Vec pdf = Vec(T(kBeta)) * (u * u * Vec(T(-0.5))).exp();
    return cdf + u * pdf;
  }
};

// fp32: the same Abramowitz-Stegun erf that at::vec (and so eager GELU) uses,
//   erf(|z|) = 1 - t * poly(t) * exp(-z^2),  t = 1 / (1 + p |z|),  z = u / sqrt(2),
// written out so the backward shares exp(-u^2 / 2) between Phi(u) and phi(u): one exp, not two.
// (Eager fp32 GELU runs oneDNN's gelu_erf, which is faster than at::vec's Sleef-based erf.)
template <>
struct Gelu<float> {
  using Vec = Vectorized<float>;
  static inline void parts(const Vec& u, Vec& cdf, Vec& e) {
    const Vec z = u * Vec(float(M_SQRT1_2));
    const Vec az = z.abs();
    const Vec t = Vec(1.0f) / at::vec::fmadd(Vec(0.3275911f), az, Vec(1.0f));
    Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
    r = at::vec::fmadd(r, t, Vec(1.421413741f));
    r = at::vec::fmadd(r, t, Vec(-0.284496736f));
    r = at::vec::fmadd(r, t, Vec(0.254829592f));
    e = (z * z).neg().exp_u20();  // exp(-u^2/2); at::vec's fast exp (~1e-6 rel), as ATen's softmax
    const Vec erf_abs = Vec(1.0f) - r * t * e;
    const Vec erf = Vec::blendv(erf_abs, erf_abs.neg(), u < Vec(0.0f));
    cdf = Vec(0.5f) * (Vec(1.0f) + erf);
  }
  static inline Vec fwd(const Vec& u) {
    Vec cdf, e;
    parts(u, cdf, e);
    return u * cdf;
  }
  static inline Vec deriv(const Vec& u) {
    Vec cdf, e;
    parts(u, cdf, e);
    return at::vec::fmadd(u * Vec(float(M_2_SQRTPI * M_SQRT1_2 * 0.5)), e, cdf);
  }
};

// Number of lanes and the length of the (possibly partial) vector starting at d.
template <typename T>
inline int64_t lanes() {
  return Vectorized<T>::size();
}
template <typename T>
inline int64_t part(int64_t d, int64_t n) {
  return std::min<int64_t>(Vectorized<T>::size(), n - d);
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}
template <typename T>
inline T hmax(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(
      [](Vectorized<T>& a, Vectorized<T>& b) { return at::vec::maximum(a, b); }, v);
}

// ---------------------------------------------------------------------------------------------
// Deterministic parallel reductions. Rows [0, n) are split into `chunks` contiguous ranges whose
// number depends only on n, grain and the thread count (not on scheduling), so results are
// reproducible run to run. Each chunk owns one row of a double partial buffer.
struct Chunks {
  int64_t n, count, size;
  Chunks(int64_t n_, int64_t grain) : n(n_) {
    const int64_t by_work = std::max<int64_t>(1, (n + grain - 1) / std::max<int64_t>(grain, 1));
    count = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
    size = (n + count - 1) / count;
    if (n == 0) count = 1, size = 0;
  }
  template <typename F>  // f(chunk, begin, end)
  void run(const F& f) const {
    at::parallel_for(0, count, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = std::min(n, c * size), e = std::min(n, (c + 1) * size);
        f(c, b, e);
      }
    });
  }
};

// acc[d] += sum over a block: callers accumulate a few dozen rows in T, then flush to double,
// a two-level (cascade-like) sum that keeps fp32 reductions as accurate as ATen's.
template <typename T>
inline void flush(double* dst, T* src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {
    dst[d] += static_cast<double>(src[d]);
    src[d] = T(0);
  }
}
constexpr int64_t kFlushRows = 64;

// Sum partial rows [count, n] (double) into a tensor of dtype `like`.
inline at::Tensor sum_partials(const std::vector<double>& parts, int64_t count, int64_t n,
                               const at::TensorOptions& opts) {
  std::vector<double> total(n, 0.0);
  for (int64_t c = 0; c < count; ++c)
    for (int64_t d = 0; d < n; ++d) total[d] += parts[c * n + d];
  at::Tensor out = at::empty({n}, opts.dtype(at::kDouble));
  std::copy(total.begin(), total.end(), out.data_ptr<double>());
  return out.to(opts.dtype());
}

// ---------------------------------------------------------------------------------------------
// Counter-based dropout hash: keep(seed, row, col) is a pure function, so the forward and the
// backward regenerate the same mask without storing it, independent of threading.
inline uint32_t mix32(uint32_t x) {  // "lowbias32" (C. Wellons), a good 32-bit integer hash
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}
struct DropoutHash {
  uint32_t seed_lo, seed_hi;
  uint32_t threshold;  // keep iff hash >= threshold; P(keep) = 1 - threshold / 2^32
  DropoutHash(int64_t seed, double p)
      : seed_lo(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        seed_hi(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        threshold(static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0))) {}
  inline uint32_t row_key(int64_t row) const {
    const uint64_t r = static_cast<uint64_t>(row);
    return mix32(static_cast<uint32_t>(r) ^ mix32(static_cast<uint32_t>(r >> 32) + seed_lo)) ^ seed_hi;
  }
  // Writes scale (kept) or 0 (dropped) for columns [0, n) of `row`; the loop vectorises.
  template <typename T>
  inline void row_factors(int64_t row, int64_t n, T scale, T* out) const {
    const uint32_t key = row_key(row), key2 = seed_hi * 0x9E3779B9U + 0x7F4A7C15U;
    const uint32_t thr = threshold;
    for (int64_t c = 0; c < n; ++c) {
      const uint32_t h = mix32(mix32(static_cast<uint32_t>(c) ^ key) + key2);
      out[c] = h >= thr ? scale : T(0);
    }
  }
};

// Where one call's keep pattern comes from: an explicit keep mask, or the hash (the fused
// residual+dropout+LayerNorm and the plain dropout share it, so both regenerate it in the backward).
struct Dropout {
  double p;
  const bool* mask;  // bool [N, H] or nullptr
  DropoutHash hash;
  bool active() const { return p > 0.0; }
  template <typename T>
  void factors(int64_t row, int64_t H, T* out) const {  // keep ? 1/(1-p) : 0
    const T scale = static_cast<T>(1.0 / (1.0 - p));
    if (mask) {
      const bool* mr = mask + row * H;
      for (int64_t c = 0; c < H; ++c) out[c] = mr[c] ? scale : T(0);
    } else {
      hash.row_factors<T>(row, H, scale, out);
    }
  }
};

// Checks p and the mask's shape; mask_holder keeps the bool copy of keep_mask alive for the call.
// p == 0 ignores the mask (no dropout), as the reference does.
inline Dropout make_dropout(const char* op, double p, const std::optional<at::Tensor>& keep_mask, int64_t seed,
                            const at::Tensor& x, at::Tensor& mask_holder) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout p must be in [0, 1), got ", p);
  Dropout drop{p, nullptr, DropoutHash(seed, p)};
  if (p > 0.0 && keep_mask.has_value() && keep_mask->defined()) {
    TORCH_CHECK(keep_mask->sizes() == x.sizes(), op, ": keep_mask must have x's shape");
    mask_holder = keep_mask->to(at::kBool).contiguous();
    drop.mask = mask_holder.const_data_ptr<bool>();
  }
  return drop;
}

// ---------------------------------------------------------------------------------------------
// Row-major GEMM: C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C, leading dims in elements.
// Calls the Fortran BLAS (MKL on x86 wheels) exported by libtorch_cpu, found with dlsym so the
// extension still loads where it is absent; then falls back to at::addmm_out on from_blob views.
// Called from inside at::parallel_for: MKL sees an active OpenMP region and runs single-threaded.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
             int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// "blas:<symbol>" or "aten" — which path gemm_rm takes (reported by nasfast::gemm_backend).
std::string gemm_backend_name();

}  // namespace nasfast
