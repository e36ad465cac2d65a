// MAGIC-A alignment loss over all layers in one pass:
//   loss = sum_l sum_{real (b,t), c} (h_l - a_l)^2 / max(1, n_real * H)
// and, in the same pass, d loss / d h_l = 2 (h_l - a_l) m / max(1, n_real * H), so the backward
// is a scale by the incoming gradient. Row sums in the I/O precision, rows accumulated in double.
#include "common.h"

namespace nasfast {
namespace {

template <typename T>
double kernel(const std::vector<const T*>& h, const std::vector<const T*>& a, const std::vector<T*>& gr,
              const bool* mask, int64_t N, int64_t H, T coef) {
  using Vec = Vectorized<T>;
  const int64_t nl = static_cast<int64_t>(h.size());
  const Chunks ch(nl * N, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)));
  std::vector<double> parts(ch.count, 0.0);
  ch.run([&](int64_t c, int64_t i0, int64_t i1) {
    double total = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t l = i / N, r = i % N;
      T* g = gr.empty() ? nullptr : gr[l] + r * H;
      if (mask && !mask[r]) {
        if (g) std::fill(g, g + H, T(0));
        continue;
      }
      const T* hr = h[l] + r * H;
      const T* ar = a[l] + r * H;
      Vec acc(T(0));
      for (int64_t d = 0; d < H; d += lanes<T>()) {
        const int64_t n = part<T>(d, H);
        const Vec diff = Vec::loadu(hr + d, n) - Vec::loadu(ar + d, n);  // 0 in padded lanes
        acc = at::vec::fmadd(diff, diff, acc);
        if (g) (diff * Vec(coef)).store(g + d, n);
      }
      total += static_cast<double>(hsum<T>(acc));
    }
    parts[c] = total;
  });
  double sum = 0.0;
  for (double p : parts) sum += p;
  return sum;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fwd(const std::vector<at::Tensor>& child,
                                                    const std::vector<at::Tensor>& anchor,
                                                    const std::optional<at::Tensor>& mask_,
                                                    bool need_grad) {
  TORCH_CHECK(!child.empty() && child.size() == anchor.size(),
              "alignment_loss: need as many anchor hiddens as child hiddens (and at least one)");
  const at::Tensor& h0 = child[0];
  TORCH_CHECK(h0.dim() >= 1, "alignment_loss: hiddens must be [B, T, H]");
  const auto dtype = h0.scalar_type();
  std::vector<at::Tensor> hs, as, grads;
  for (size_t l = 0; l < child.size(); ++l) {
    TORCH_CHECK(child[l].sizes() == h0.sizes() && anchor[l].sizes() == h0.sizes(),
                "alignment_loss: all hiddens must have the same shape");
    TORCH_CHECK(child[l].scalar_type() == dtype && anchor[l].scalar_type() == dtype,
                "alignment_loss: all hiddens must have the same dtype");
    hs.push_back(child[l].contiguous());
    as.push_back(anchor[l].contiguous());
    if (need_grad) grads.push_back(at::empty_like(hs.back()));
  }
  const int64_t H = h0.size(-1), N = H == 0 ? 0 : h0.numel() / H;
  at::Tensor m;
  double denom = static_cast<double>(N) * static_cast<double>(H);
  if (mask_.has_value() && mask_->defined()) {
    TORCH_CHECK(mask_->numel() == N, "alignment_loss: token_mask must be [B, T]");
    m = mask_->to(at::kBool).contiguous();
    denom = static_cast<double>(m.sum().item<int64_t>()) * static_cast<double>(H);
  }
  denom = std::max(denom, 1.0);
  at::Tensor loss = at::empty({}, h0.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "alignment_loss_fwd", [&] {
    std::vector<const scalar_t*> hp, ap;
    std::vector<scalar_t*> gp;
    for (size_t l = 0; l < hs.size(); ++l) {
      hp.push_back(hs[l].const_data_ptr<scalar_t>());
      ap.push_back(as[l].const_data_ptr<scalar_t>());
      if (need_grad) gp.push_back(grads[l].data_ptr<scalar_t>());
    }
    const double sum = kernel<scalar_t>(hp, ap, gp, m.defined() ? m.const_data_ptr<bool>() : nullptr, N, H,
                                        static_cast<scalar_t>(2.0 / denom));
    loss.fill_(sum / denom);
  });
  return {loss, grads};
}

}  // namespace
}  // namespace nasfast

TORCH_LIBRARY_IMPL(nasfast, CPU, m) {
  m.impl("alignment_loss_fwd", &nasfast::fwd);
}
