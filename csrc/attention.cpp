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

constexpr int64_t kBlockQ = 128;

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

template <typename T>
struct OutHeads {  // a writable [B, h, T, dh] view: rows of dh at leading dim ld
  T* p;
  int64_t s0, s1, ld;
  T* at(int64_t b, int64_t h) const { return p + b * s0 + h * s1; }
  void zero_rows(int64_t b, int64_t h, int64_t r0, int64_t n, int64_t dh) const {
    for (int64_t r = r0; r < r0 + n; ++r) std::fill(at(b, h) + r * ld, at(b, h) + r * ld + dh, T(0));
  }
};

template <typename T>
OutHeads<T> contiguous_heads(T* p, int64_t nh, int64_t L, int64_t dh) {  // [B, h, T, dh] contiguous
  return OutHeads<T>{p, nh * L * dh, L * dh, dh};
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
                const OutHeads<T>& out, T* lse, int64_t B, int64_t nh, int64_t L, int64_t dh) {
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
      T* o = out.at(b, h) + r0 * out.ld;
      T* ls = lse + bh * L + r0;
      if (!any[b]) {  // every key is padding: zeros (lse = +inf: the probabilities are all 0)
        out.zero_rows(b, h, r0, nq, dh);
        std::fill(ls, ls + nq, std::numeric_limits<T>::infinity());
        continue;
      }
      gemm_rm<T>(false, true, nq, L, dh, scale, q.at(b, h) + r0 * q.ld, q.ld, k.at(b, h), k.ld, T(0),
                 S.data(), L);
      softmax_rows<T>(S.data(), nq, L, kb.data() + b * L, ls);
      gemm_rm<T>(false, false, nq, dh, L, T(1), S.data(), L, v.at(b, h), v.ld, T(0), o, out.ld);
    }
  });
}

template <typename T>
void bwd_kernel(const Heads<T>& g, const Heads<T>& q, const Heads<T>& k, const Heads<T>& v,
                const at::Tensor& mask, const OutHeads<T>& dq, const OutHeads<T>& dk, const OutHeads<T>& dv,
                int64_t B, int64_t nh, int64_t L, int64_t dh) {
  using Vec = Vectorized<T>;
  std::vector<T> kb;
  std::vector<char> any;
  key_bias<T>(mask, B, L, kb, any);
  const T scale = T(1) / std::sqrt(static_cast<T>(dh));
  at::parallel_for(0, B * nh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> P(kBlockQ * L), dP(kBlockQ * L), Di(kBlockQ);
    for (int64_t bh = i0; bh < i1; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      T* dqh = dq.at(b, h);
      T* dkh = dk.at(b, h);
      T* dvh = dv.at(b, h);
      if (!any[b]) {
        dq.zero_rows(b, h, 0, L, dh);
        dk.zero_rows(b, h, 0, L, dh);
        dv.zero_rows(b, h, 0, L, dh);
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
        gemm_rm<T>(true, false, L, dh, nq, T(1), P.data(), L, gb, g.ld, beta, dvh, dv.ld);  // dV += P^T dO
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
        gemm_rm<T>(false, false, nq, dh, L, T(1), P.data(), L, k.at(b, h), k.ld, T(0), dqh + r0 * dq.ld, dq.ld);
        gemm_rm<T>(true, false, L, dh, nq, T(1), P.data(), L, qb, q.ld, beta, dkh, dk.ld);  // dK += dS^T Q
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
                         contiguous_heads<scalar_t>(out.data_ptr<scalar_t>(), nh, L, dh),
                         lse.data_ptr<scalar_t>(), B, nh, L, dh);
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
                         contiguous_heads<scalar_t>(dq.data_ptr<scalar_t>(), nh, L, dh),
                         contiguous_heads<scalar_t>(dk.data_ptr<scalar_t>(), nh, L, dh),
                         contiguous_heads<scalar_t>(dv.data_ptr<scalar_t>(), nh, L, dh), B, nh, L, dh);
  });
  return {dq, dk, dv};
}

// ---- packed QKV: qkv [B, T, 3H] (q | k | v, heads of dh = H / h inside each), output [B, T, H] and
// d(qkv) [B, T, 3H] written in place by the same kernels through strided views, so the model needs
// no permute/unbind of q, k, v, no transposed copy of the output and no stack of their gradients.
at::Tensor packed_rows(const at::Tensor& t) {  // unit stride on the feature dim, rows addressable by BLAS
  const bool ok = t.stride(2) == 1 && (t.size(1) <= 1 || t.stride(1) >= t.size(2));
  return ok && t.size(1) > 1 ? t : t.contiguous();
}

template <typename T>
Heads<T> packed_in(const at::Tensor& t, int64_t offset, int64_t dh) {  // columns [offset, offset + H) of t
  return Heads<T>{t.const_data_ptr<T>() + offset, t.stride(0), dh, t.size(1) > 1 ? t.stride(1) : t.size(2)};
}

template <typename T>
OutHeads<T> packed_out(at::Tensor& t, int64_t offset, int64_t dh) {  // t contiguous [B, T, C]
  return OutHeads<T>{t.data_ptr<T>() + offset, t.size(1) * t.size(2), dh, t.size(2)};
}

void check_packed(const at::Tensor& qkv, int64_t nh, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0, "attention_qkv: qkv must be [B, T, 3H]");
  TORCH_CHECK(nh > 0 && (qkv.size(2) / 3) % nh == 0, "attention_qkv: heads must divide H");
  if (mask.has_value() && mask->defined())
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == qkv.size(0) && mask->size(1) == qkv.size(1),
                "attention_qkv: token_mask must be [B, T]");
}

std::tuple<at::Tensor, at::Tensor> qkv_fwd(const at::Tensor& qkv_, int64_t nh,
                                           const std::optional<at::Tensor>& mask_) {
  check_packed(qkv_, nh, mask_);
  const at::Tensor qkv = packed_rows(qkv_), m = mask_of(mask_);
  const int64_t B = qkv.size(0), L = qkv.size(1), H = qkv.size(2) / 3, dh = H / nh;
  at::Tensor out = at::empty({B, L, H}, qkv.options()), lse = at::empty({B, nh, L}, qkv.options());
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "attention_qkv_fwd", [&] {
    fwd_kernel<scalar_t>(packed_in<scalar_t>(qkv, 0, dh), packed_in<scalar_t>(qkv, H, dh),
                         packed_in<scalar_t>(qkv, 2 * H, dh), m, packed_out<scalar_t>(out, 0, dh),
                         lse.data_ptr<scalar_t>(), B, nh, L, dh);
  });
  return {out, lse};
}

at::Tensor qkv_bwd(const at::Tensor& g_, const at::Tensor& qkv_, int64_t nh,
                   const std::optional<at::Tensor>& mask_) {
  check_packed(qkv_, nh, mask_);
  TORCH_CHECK(g_.dim() == 3 && g_.size(0) == qkv_.size(0) && g_.size(1) == qkv_.size(1) &&
                  g_.size(2) * 3 == qkv_.size(2),
              "attention_qkv_bwd: grad must be [B, T, H]");
  const at::Tensor qkv = packed_rows(qkv_), g = packed_rows(g_), m = mask_of(mask_);
  const int64_t B = qkv.size(0), L = qkv.size(1), H = qkv.size(2) / 3, dh = H / nh;
  at::Tensor dqkv = at::empty({B, L, 3 * H}, qkv.options());
  if (dqkv.numel() == 0) return dqkv;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "attention_qkv_bwd", [&] {
    bwd_kernel<scalar_t>(packed_in<scalar_t>(g, 0, dh), packed_in<scalar_t>(qkv, 0, dh),
                         packed_in<scalar_t>(qkv, H, dh), packed_in<scalar_t>(qkv, 2 * H, dh), m,
                         packed_out<scalar_t>(dqkv, 0, dh), packed_out<scalar_t>(dqkv, H, dh),
                         packed_out<scalar_t>(dqkv, 2 * H, dh), B, nh, L, dh);
  });
  return dqkv;
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("attention_fwd", &nasfast::fwd);
  m.impl("attention_bwd", &nasfast::bwd);
  m.impl("attention_qkv_fwd", &nasfast::qkv_fwd);
  m.impl("attention_qkv_bwd", &nasfast::qkv_bwd);
}
