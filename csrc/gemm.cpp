// Row-major GEMM on raw pointers for the fused attention (see common.h for the contract).
#include "common.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace nasfast {
namespace {

// Fortran BLAS, LP64 (32-bit ints) — the interface MKL and OpenBLAS both export as sgemm_/dgemm_.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*,
                          double*, const int*);

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  std::string name = "aten";
};

const Blas& blas() {
  static Blas b = [] {
    Blas r;
    const char* force = std::getenv("NASFAST_NATIVE_GEMM");
    if (force && std::string(force) == "aten") return r;
    // The library that defines at::get_num_threads is libtorch_cpu; look the symbols up there.
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) || !info.dli_fname) return r;
    void* handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!handle) return r;
    auto s = reinterpret_cast<sgemm_fn>(dlsym(handle, "sgemm_"));
    auto d = reinterpret_cast<dgemm_fn>(dlsym(handle, "dgemm_"));
    if (s && d) {
      r.sgemm = s;
      r.dgemm = d;
      r.name = "blas:sgemm_";
    }
    return r;
  }();
  return b;
}

template <typename T>
void gemm_aten(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), ta ? at::IntArrayRef{K, M} : at::IntArrayRef{M, K},
                               {lda, 1}, opts);
  at::Tensor b = at::from_blob(const_cast<T*>(B), tb ? at::IntArrayRef{N, K} : at::IntArrayRef{K, N},
                               {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::Tensor r = at::addmm(c, ta ? a.t() : a, tb ? b.t() : b, beta, alpha);
  c.copy_(r);
}

}  // namespace

template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const Blas& bl = blas();
  const bool fits = std::max({M, N, K, lda, ldb, ldc}) < (int64_t(1) << 31);
  if (bl.sgemm && fits && K > 0) {
    // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      bl.sgemm(&opb, &opa, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    } else {
      bl.dgemm(&opb, &opa, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    }
    return;
  }
  gemm_aten<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template void gemm_rm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                             const float*, int64_t, float, float*, int64_t);
template void gemm_rm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                              const double*, int64_t, double, double*, int64_t);

std::string gemm_backend_name() { return blas().name; }

}  // namespace nasfast
