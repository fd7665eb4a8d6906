// What every kernel of rhn's native extension uses: ATen's vector type (with the SLEEF
// tanh/exp that torch.tanh and torch.sigmoid use), the row and mask views that the
// elementwise passes take, and the parallel grain. The extension is one module built from
// all the .cpp files here by rhn_cli/kernels/native.py; module.cpp binds its entry points.
#pragma once

// ATen's Tensor and the operators each file uses (ATen/ops/<name>.h), not all of ATen:
// a fraction of the build time per file.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace rhn {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// Rows per parallel task: at least ~4k numbers of work, so small B x H stays on one
// thread instead of paying for a parallel region.
inline int64_t grain(int64_t width) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, width));
}

template <typename T>
inline Vec<T> sigmoid(Vec<T> x) {  // as torch.sigmoid's CPU kernel: 1 / (1 + exp(-x))
  return (Vec<T>(T(1)) + (Vec<T>(T(0)) - x).exp()).reciprocal();
}

// Row-major [rows, cols] with a row stride: where a [B, H] operand lives.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t ld = 0;
  T* row(int64_t b) const { return data ? data + b * ld : nullptr; }
};

template <typename T>
Rows<T> rows(const Tensor& t) {  // a [B, n] tensor (or view) with unit column stride
  TORCH_CHECK(t.stride(-1) == 1, "rhn native kernels: rows need unit column stride");
  return {t.data_ptr<T>(), t.stride(0)};
}

// The masks of s for the next product: none, shared ([B, H]) or separate ([B, 2, H]).
template <typename T>
struct Masks {
  const T* m0 = nullptr;  // H rows' (or shared) mask
  const T* m1 = nullptr;  // T rows' mask (separate masks only)
  int64_t ld = 0;
};

template <typename T, typename F>
T horizontal(const Vec<T>& lanes, F combine) {  // combine over a vector's lanes
  T values[Vec<T>::size()];
  lanes.store(values);
  T result = values[0];
  for (int64_t k = 1; k < Vec<T>::size(); ++k) result = combine(result, values[k]);
  return result;
}

}  // namespace rhn
