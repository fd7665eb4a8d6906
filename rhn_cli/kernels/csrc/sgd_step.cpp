// SGD with the L2 term and clipping (rhn_cli.engine.optim.penalised_step).
//
// Pass 1: sum p^2 and sum (g + wd p)^2 over every parameter, one read of p and g; pass 2:
// p -= step (g + wd p). The Python path's four passes (the penalty's norm, g += wd p, the
// gradient's norm, the SGD update) read and write about 1.6 times as much memory.
#include "sgd_step.h"

#include <utility>

namespace rhn {
namespace {

template <typename T>
std::pair<double, double> squares(const Tensor& p, const Tensor& g, double wd) {
  const int64_t n = p.numel();
  constexpr int64_t W = Vec<T>::size();
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> ps(chunks, 0.0), gs(chunks, 0.0);
  const T* pd = p.data_ptr<T>();
  const T* gd = g.data_ptr<T>();
  const Vec<T> decay = Vec<T>(static_cast<T>(wd));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunk, last = std::min(n, first + kChunk);
      Vec<T> pv(T(0)), gv(T(0));
      int64_t i = first;
      for (; i + W <= last; i += W) {
        auto x = Vec<T>::loadu(pd + i);
        auto d = Vec<T>::loadu(gd + i) + decay * x;
        pv = pv + x * x;
        gv = gv + d * d;
      }
      double psum = horizontal(pv, [](T a, T b) { return a + b; });
      double gsum = horizontal(gv, [](T a, T b) { return a + b; });
      for (; i < last; ++i) {
        const double d = double(gd[i]) + wd * double(pd[i]);
        psum += double(pd[i]) * double(pd[i]);
        gsum += d * d;
      }
      ps[c] = psum;
      gs[c] = gsum;
    }
  });
  double psum = 0.0, gsum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) psum += ps[c], gsum += gs[c];
  return {psum, gsum};
}

template <typename T>
void update(const Tensor& p, const Tensor& g, double wd, double step) {
  const int64_t n = p.numel();
  constexpr int64_t W = Vec<T>::size();
  T* pd = p.data_ptr<T>();
  const T* gd = g.data_ptr<T>();
  const Vec<T> decay = Vec<T>(static_cast<T>(wd)), rate = Vec<T>(static_cast<T>(step));
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + W <= end; i += W) {
      auto x = Vec<T>::loadu(pd + i);
      (x - rate * (Vec<T>::loadu(gd + i) + decay * x)).store(pd + i);
    }
    for (; i < end; ++i) pd[i] -= T(step) * (gd[i] + T(wd) * pd[i]);
  });
}

void check_pairs(const std::vector<Tensor>& params, const std::vector<Tensor>& grads) {
  TORCH_CHECK(params.size() == grads.size(), "rhn native kernels: one gradient per parameter");
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(params[k].is_contiguous() && grads[k].is_contiguous() &&
                    params[k].numel() == grads[k].numel() &&
                    params[k].scalar_type() == grads[k].scalar_type(),
                "rhn native kernels: contiguous parameters with gradients of their size and dtype");
  }
}

}  // namespace

std::vector<double> l2_squares(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                               double wd) {
  check_pairs(params, grads);
  double psum = 0.0, gsum = 0.0;
  for (size_t k = 0; k < params.size(); ++k) {
    AT_DISPATCH_FLOATING_TYPES(params[k].scalar_type(), "rhn_l2_squares", [&] {
      auto [a, b] = squares<scalar_t>(params[k], grads[k], wd);
      psum += a;
      gsum += b;
    });
  }
  return {psum, gsum};
}

void l2_sgd_update(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, double wd,
                   double step) {
  check_pairs(params, grads);
  at::NoGradGuard no_grad;
  for (size_t k = 0; k < params.size(); ++k) {
    AT_DISPATCH_FLOATING_TYPES(params[k].scalar_type(), "rhn_l2_sgd_update",
                               [&] { update<scalar_t>(params[k], grads[k], wd, step); });
  }
}

}  // namespace rhn
