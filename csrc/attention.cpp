// Softmax attention with a key-padding mask, fused per (batch, head, block of query rows) in the
// style of flash attention: scores for one block of BQ rows against all keys live in a
// thread-local [BQ, T] buffer (L2-resident at BERT lengths), softmax is done in place, and only
// the output and one log-sum-exp per row are written. No [B, h, T, T] tensor is ever materialised.
// Backward recomputes each block's full rows of P with the very code (and GEMM shapes) of the
// forward, so P is bitwise the forward's, and forms D_i = sum_j P_ij dP_ij from those rows rather
// than from the saved lse and dO . O: with a saturated softmax (scores ~1e3) an fp32 lse rounds
// away log(sum), and dP_ij - dO . O_i subtracts two separately rounded dot products whose true
// difference is ~0. Computed this way the subtraction cancels exactly as in eager's softmax
// backward. The saved lse is returned for callers; backward does not read it.
// Semantics follow kernels/reference.py: masked keys get probability exactly 0; a query row whose
// keys are all padding outputs zeros and passes no gradient.
// exp: at::vec's exp_u20 (fp32 ~1e-6 relative, -inf -> 0; exact exp for fp64), as ATen's CPU flash
// attention. GEMMs: BLAS sgemm_/dgemm_ (single-threaded inside the parallel region), see gemm.cpp.
#include "common.h"

#include <limits>

namespace nasfast {
namespace {

constexpr int64_t kBlockQ = 64;

template <typename T>
struct Heads {  // a [B, h, T, dh] tensor with unit stride on dh
  const T* p;
  int64_t s0, s1, ld;
  const T* at(int64_t b, int64_t h) const { return p + b * s0 + h * s1; }
};

at::Tensor rows_ok(const at::Tensor& t) {  // keep views whose rows BLAS can address directly
  const bool ok = t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(3));
  return ok && t.size(2) > 1 ? t : t.contiguous();
}

template <typename T>
Heads<T> heads(const at::Tensor& t) {
  return Heads<T>{t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.size(2) > 1 ? t.stride(2) : t.size(3)};
}

// Additive key bias (0 real / -inf pad) [B, T] and, per batch row, whether any key is real.
template <typename T>
void key_bias(const at::Tensor& mask, int64_t B, int64_t L, std::vector<T>& kb, std::vector<char>& any) {
  kb.assign(B * L, T(0));
  any.assign(B, 1);
  if (!mask.defined()) return;
  const bool* m = mask.const_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    bool a = false;
    for (int64_t t = 0; t < L; ++t) {
      kb[b * L + t] = m[b * L + t] ? T(0) : -std::numeric_limits<T>::infinity();
      a = a || m[b * L + t];
    }
    any[b] = a;
  }
}

// Rows [0, nq) of S (leading dim L) -> softmax(S + key bias) in place; lse[i] = max + log(sum).
template <typename T>
void softmax_rows(T* S, int64_t nq, int64_t L, const T* kbb, T* lse) {
  using Vec = Vectorized<T>;
  for (int64_t i = 0; i < nq; ++i) {
    T* s = S + i * L;
    Vec mx(-std::numeric_limits<T>::infinity());
    for (int64_t d = 0; d < L; d += lanes<T>()) {
      const int64_t n = part<T>(d, L);
      const Vec x = Vec::loadu(s + d, n) + Vec::loadu(kbb + d, n);
      x.store(s + d, n);
      mx = at::vec::maximum(mx, n == lanes<T>() ? x : Vec::set(mx, x, n));
    }
    const T m = hmax<T>(mx);  // finite: the caller skips batch rows without a real key
    Vec sum(T(0));
    for (int64_t d = 0; d < L; d += lanes<T>()) {
      const int64_t n = part<T>(d, L);
      const Vec e = (Vec::loadu(s + d, n) - Vec(m)).exp_u20();
      e.store(s + d, n);
      sum = sum + (n == lanes<T>() ? e : Vec::set(Vec(T(0)), e, n));
    }
    const T tot = hsum<T>(sum);
    const Vec inv(T(1) / tot);
    for (int64_t d = 0; d < L; d += lanes<T>()) {
      const int64_t n = part<T>(d, L);
      (Vec::loadu(s + d, n) * inv).store(s + d, n);
    }
    if (lse) lse[i] = m + std::log(tot);
  }
}

template <typename T>
void fwd_kernel(const Heads<T>& q, const Heads<T>& k, const Heads<T>& v, const at::Tensor& mask,
                T* out, T* lse, int64_t B, int64_t nh, int64_t L, int64_t dh) {
  std::vector<T> kb;
  std::vector<char> any;
  key_bias<T>(mask, B, L, kb, any);
  const T scale = T(1) / std::sqrt(static_cast<T>(dh));
  const int64_t nqb = (L + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, B * nh * nqb, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> S(kBlockQ * L);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bh = item / nqb, b = bh / nh, h = bh % nh;
      const int64_t r0 = (item % nqb) * kBlockQ, nq = std::min(kBlockQ, L - r0);
      T* o = out + (bh * L + r0) * dh;
      T* ls = lse + bh * L + r0;
      if (!any[b]) {  // every key is padding: zeros (lse = +inf: the probabilities are all 0)
        std::fill(o, o + nq * dh, T(0));
        std::fill(ls, ls + nq, std::numeric_limits<T>::infinity());
        continue;
      }
      gemm_rm<T>(false, true, nq, L, dh, scale, q.at(b, h) + r0 * q.ld, q.ld, k.at(b, h), k.ld, T(0),
                 S.data(), L);
      softmax_rows<T>(S.data(), nq, L, kb.data() + b * L, ls);
      gemm_rm<T>(false, false, nq, dh, L, T(1), S.data(), L, v.at(b, h), v.ld, T(0), o, dh);
    }
  });
}

template <typename T>
void bwd_kernel(const Heads<T>& g, const Heads<T>& q, const Heads<T>& k, const Heads<T>& v,
                const at::Tensor& mask, T* dq, T* dk, T* dv, int64_t B, int64_t nh, int64_t L, int64_t dh) {
  using Vec = Vectorized<T>;
  std::vector<T> kb;
  std::vector<char> any;
  key_bias<T>(mask, B, L, kb, any);
  const T scale = T(1) / std::sqrt(static_cast<T>(dh));
  at::parallel_for(0, B * nh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> P(kBlockQ * L), dP(kBlockQ * L), Di(kBlockQ);
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      T* dqh = dq + bh * L * dh;
      T* dkh = dk + bh * L * dh;
      T* dvh = dv + bh * L * dh;
      if (!any[b]) {
        std::fill(dqh, dqh + L * dh, T(0));
        std::fill(dkh, dkh + L * dh, T(0));
        std::fill(dvh, dvh + L * dh, T(0));
        continue;
      }
      for (int64_t r0 = 0; r0 < L; r0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, L - r0);
        const T beta = r0 == 0 ? T(0) : T(1);  // first block initialises dK, dV
        const T* qb = q.at(b, h) + r0 * q.ld;
        const T* gb = g.at(b, h) + r0 * g.ld;
        // P exactly as the forward computed it (same GEMM shape, same softmax code)
        gemm_rm<T>(false, true, nq, L, dh, scale, qb, q.ld, k.at(b, h), k.ld, T(0), P.data(), L);
        softmax_rows<T>(P.data(), nq, L, kb.data() + b * L, nullptr);
        gemm_rm<T>(true, false, L, dh, nq, T(1), P.data(), L, gb, g.ld, beta, dvh, dh);  // dV += P^T dO
        gemm_rm<T>(false, true, nq, L, dh, T(1), gb, g.ld, v.at(b, h), v.ld, T(0), dP.data(), L);
        for (int64_t i = 0; i < nq; ++i) {  // D_i = sum_j P_ij dP_ij (= dO_i . O_i, from the same dP)
          const T* p = P.data() + i * L;
          const T* dp = dP.data() + i * L;
          Vec acc(T(0));
          for (int64_t d = 0; d < L; d += lanes<T>()) {
            const int64_t n = part<T>(d, L);
            acc = at::vec::fmadd(Vec::loadu(p + d, n), Vec::loadu(dp + d, n), acc);  // 0 in padded lanes
          }
          Di[i] = hsum<T>(acc);
        }
        for (int64_t i = 0; i < nq; ++i) {  // dS = scale * P * (dP - D_i), in place of P
          T* p = P.data() + i * L;
          const T* dp = dP.data() + i * L;
          const Vec di(Di[i]);
          for (int64_t d = 0; d < L; d += lanes<T>()) {
            const int64_t n = part<T>(d, L);
            (Vec::loadu(p + d, n) * (Vec::loadu(dp + d, n) - di) * Vec(scale)).store(p + d, n);
          }
        }
        gemm_rm<T>(false, false, nq, dh, L, T(1), P.data(), L, k.at(b, h), k.ld, T(0), dqh + r0 * dh, dh);
        gemm_rm<T>(true, false, L, dh, nq, T(1), P.data(), L, qb, q.ld, beta, dkh, dh);  // dK += dS^T Q
      }
    }
  });
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "attention: q, k, v must all be [B, h, T, dh] (same shapes)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v dtypes differ");
  if (mask.has_value() && mask->defined())
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == q.size(2),
                "attention: token_mask must be [B, T]");
}

at::Tensor mask_of(const std::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? mask->to(at::kBool).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                       const std::optional<at::Tensor>& mask_) {
  check(q_, k_, v_, mask_);
  const at::Tensor q = rows_ok(q_), k = rows_ok(k_), v = rows_ok(v_), m = mask_of(mask_);
  const int64_t B = q.size(0), nh = q.size(1), L = q.size(2), dh = q.size(3);
  at::Tensor out = at::empty({B, nh, L, dh}, q.options()), lse = at::empty({B, nh, L}, q.options());
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd", [&] {
    fwd_kernel<scalar_t>(heads<scalar_t>(q), heads<scalar_t>(k), heads<scalar_t>(v), m,
                         out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B, nh, L, dh);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& g_, const at::Tensor& q_,
                                                   const at::Tensor& k_, const at::Tensor& v_,
                                                   const at::Tensor& out_, const at::Tensor& lse_,
                                                   const std::optional<at::Tensor>& mask_) {
  check(q_, k_, v_, mask_);
  TORCH_CHECK(g_.sizes() == q_.sizes(), "attention_bwd: grad must have q's shape");
  const at::Tensor g = rows_ok(g_), q = rows_ok(q_), k = rows_ok(k_), v = rows_ok(v_),
                   m = mask_of(mask_);
  (void)out_, (void)lse_;  // in the schema for callers that pair fwd and bwd; backward recomputes P
  const int64_t B = q.size(0), nh = q.size(1), L = q.size(2), dh = q.size(3);
  at::Tensor dq = at::empty({B, nh, L, dh}, q.options()), dk = at::empty_like(dq), dv = at::empty_like(dq);
  if (dq.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd", [&] {
    bwd_kernel<scalar_t>(heads<scalar_t>(g), heads<scalar_t>(q), heads<scalar_t>(k), heads<scalar_t>(v), m,
                         dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                         B, nh, L, dh);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("attention_fwd", &nasfast::fwd);
  m.impl("attention_bwd", &nasfast::bwd);
}
