// Softmax cross-entropy (rhn_cli.engine.objective's training loss).
//
// Forward: lse_n = log sum_v exp(x_nv) per row, and the summed loss
// sum_n (lse_n - x_n,t_n) over rows whose target is not ``ignore``. Backward: the
// gradient scale * (softmax(x_n) - onehot(t_n)) (zero for ignored rows), written
// column-major, [V, N]: the layout in which the output layer's weight-gradient product
// dlogits^T x takes it without a transposed copy (28 MB at ptb_sota).
#include "cross_entropy.h"

#include "transpose.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <cmath>
#include <limits>

namespace rhn {
namespace {

template <typename T>
std::vector<Tensor> cross_entropy_forward_impl(const Tensor& logits, const Tensor& targets,
                                               int64_t ignore) {
  const int64_t N = logits.size(0), V = logits.size(1);
  constexpr int64_t W = Vec<T>::size();
  auto lse = at::empty({N}, logits.options());
  std::vector<double> losses(N, 0.0);
  const T* x = logits.data_ptr<T>();
  const int64_t* t = targets.data_ptr<int64_t>();
  T* l = lse.data_ptr<T>();
  at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* row = x + n * V;
      Vec<T> tops(-std::numeric_limits<T>::infinity());
      int64_t v = 0;
      for (; v + W <= V; v += W) tops = at::vec::maximum(tops, Vec<T>::loadu(row + v));
      T top = horizontal(tops, [](T a, T b) { return std::isnan(a) || a > b ? a : b; });
      for (; v < V; ++v) top = std::isnan(row[v]) || row[v] > top ? row[v] : top;
      const Vec<T> shift(top);
      Vec<T> sums(T(0));
      for (v = 0; v + W <= V; v += W) sums = sums + (Vec<T>::loadu(row + v) - shift).exp();
      T sum = horizontal(sums, [](T a, T b) { return a + b; });
      for (; v < V; ++v) sum += std::exp(row[v] - top);
      l[n] = top + std::log(sum);
      if (t[n] != ignore) {
        TORCH_CHECK(t[n] >= 0 && t[n] < V, "target ", t[n], " is out of bounds for ", V, " classes");
        losses[n] = double(l[n]) - double(row[t[n]]);
      }
    }
  });
  double total = 0.0;
  for (double loss : losses) total += loss;
  return {at::full({}, total, logits.options()), lse};
}

template <typename T>
Tensor cross_entropy_backward_impl(const Tensor& logits, const Tensor& lse, const Tensor& targets,
                                   int64_t ignore, double scale_in) {
  const int64_t N = logits.size(0), V = logits.size(1);
  constexpr int64_t W = Vec<T>::size();
  constexpr int64_t kRows = 16, kCols = 256;  // a tile: 16 rows, 256 classes
  auto grad = at::empty({V, N}, logits.options());
  const T* x = logits.data_ptr<T>();
  const T* l = lse.data_ptr<T>();
  const int64_t* t = targets.data_ptr<int64_t>();
  T* g = grad.data_ptr<T>();
  const T scale = T(scale_in);
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    T tile[kRows][kCols];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kRows, rows = std::min(kRows, N - n0);
      for (int64_t v0 = 0; v0 < V; v0 += kCols) {
        const int64_t cols = std::min(kCols, V - v0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + r;
          T* out = tile[r];
          if (t[n] == ignore) {
            std::fill(out, out + cols, T(0));
            continue;
          }
          const T* row = x + n * V + v0;
          const Vec<T> shift(l[n]), factor(scale);
          int64_t j = 0;
          for (; j + W <= cols; j += W)
            ((Vec<T>::loadu(row + j) - shift).exp() * factor).store(out + j);
          for (; j < cols; ++j) out[j] = std::exp(row[j] - l[n]) * scale;
          if (t[n] >= v0 && t[n] < v0 + cols) out[t[n] - v0] -= scale;
        }
        transpose_columns<T>(&tile[0][0], kCols, rows, cols, g + v0 * N + n0, N, 0,
                             (cols + 15) / 16);
      }
    }
    fence_streaming_stores();
  });
  return grad;
}

}  // namespace

std::vector<Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& targets,
                                          int64_t ignore) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "rhn native kernels: logits [N, V], contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.is_contiguous() &&
                  targets.scalar_type() == at::kLong,
              "rhn native kernels: targets [N], int64");
  at::NoGradGuard no_grad;
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "rhn_cross_entropy", [&] {
    return cross_entropy_forward_impl<scalar_t>(logits, targets, ignore);
  });
}

Tensor cross_entropy_backward(const Tensor& logits, const Tensor& lse, const Tensor& targets,
                              int64_t ignore, double scale) {
  at::NoGradGuard no_grad;
  return AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "rhn_cross_entropy_backward", [&] {
    return cross_entropy_backward_impl<scalar_t>(logits, lse, targets, ignore, scale);
  });
}

}  // namespace rhn
