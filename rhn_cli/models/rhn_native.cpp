// The time loop of rhn_fast's recurrence in C++ (CPU, float32/float64), built on first
// use by rhn_cli/models/rhn_native.py. Same operations, same order, as the Python loop
// in rhn_fast.py, whose docstring has the equations; what changes is how they run:
//
// - the matrix products are ATen's addmm/mm into preallocated buffers (float64, or when
//   no packed weights are given), or oneDNN's mkldnn::_linear_pointwise on weights
//   packed once per forward/backward by rhn_fast.py (float32), without Python's
//   interpreter between them;
// - each micro-step's elementwise work (gates, highway update, the mask for the next
//   product; in the backward dp, 1 - g and the states s^i from the kept gates) is one
//   vectorised pass (ATen's Vectorized, the SLEEF tanh/exp that torch.tanh and
//   torch.sigmoid use) split over rows with at::parallel_for, where the Python loop
//   issues about ten single-threaded kernels that each read and write the whole [B, H].
//
// Zoneout draws come from at::rand_like on the same generator, in the same order, as
// torch.rand_like in the Python loop, so a seed gives the same masks on either path.
//
// Also here, at the end: the training loss's softmax cross-entropy and its gradient
// (rhn_cli/engine/cross_entropy.py), one pass each, and plain SGD with the L2 term and
// gradient clipping in two passes (rhn_cli/engine/optim.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// Rows per parallel task: at least ~4k numbers of work, so small B x H stays on one
// thread instead of paying for a parallel region.
int64_t grain(int64_t width) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, width)); }

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
  TORCH_CHECK(t.stride(-1) == 1, "rhn_native: rows need unit column stride");
  return {t.data_ptr<T>(), t.stride(0)};
}

// The masks of s for the next product: none, shared ([B, H]) or separate ([B, 2, H]).
template <typename T>
struct Masks {
  const T* m0 = nullptr;  // H rows' (or shared) mask
  const T* m1 = nullptr;  // T rows' mask (separate masks only)
  int64_t ld = 0;
};

// One micro-step forward, from the product's result (ph, pt: H and T halves, bias
// included): p = result (+ x for layer 0), h = tanh(p_H), g = sigmoid(p_T) stored into
// gates (kept for the backward, which then needs no tanh or sigmoid of its own),
// out = s + (h - s) g; and s_next * m into sm0/sm1 for the next product.
template <typename T>
void gate_forward(int64_t B, int64_t H, Rows<T> ph_in, Rows<T> pt_in, Rows<T> gates,
                  Rows<T> x, Rows<T> s, Rows<T> out, Masks<T> m, Rows<T> sm0, Rows<T> sm1) {
  constexpr int64_t V = Vec<T>::size();
  at::parallel_for(0, B, grain(2 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* phr = ph_in.row(b);
      const T* ptr = pt_in.row(b);
      T* gr = gates.row(b);
      const T* xr = x.row(b);
      const T* sr = s.row(b);
      T* outr = out.row(b);
      const T* m0 = m.m0 ? m.m0 + b * m.ld : nullptr;
      const T* m1 = m.m1 ? m.m1 + b * m.ld : nullptr;
      for (int64_t j = 0; j < H; j += V) {
        const int64_t n = std::min(V, H - j);
        auto ph = Vec<T>::loadu(phr + j, n);
        auto pt = Vec<T>::loadu(ptr + j, n);
        if (xr) {
          ph = ph + Vec<T>::loadu(xr + j, n);
          pt = pt + Vec<T>::loadu(xr + H + j, n);
        }
        auto h = ph.tanh();
        auto g = sigmoid(pt);
        h.store(gr + j, n);  // the product's result may be here: read first
        g.store(gr + H + j, n);
        auto sv = Vec<T>::loadu(sr + j, n);
        auto next = sv + (h - sv) * g;
        next.store(outr + j, n);
        if (sm0.data) (next * Vec<T>::loadu(m0 + j, n)).store(sm0.row(b) + j, n);
        if (sm1.data) (next * Vec<T>::loadu(m1 + j, n)).store(sm1.row(b) + j, n);
      }
    }
  });
}

// The backward's reconstruction of micro-layers [first, last) of one step: from s^first
// in S[first] and the gates [h | g] kept by the forward (pre[i] for each layer; the
// pre-activations p, whose gates are computed here, for recomputed layers),
//   dp[i] = [g (1 - h^2) | (h - s^i) g (1 - g)]   (still to be multiplied by a)
//   carry[i] = 1 - g,   S[i + 1] = s^i + (h - s^i) g   (for i + 1 < D).
template <typename T>
void gate_reconstruct(int64_t B, int64_t H, int64_t D, int64_t first, int64_t last,
                      const std::vector<Rows<T>>& pre, const std::vector<Rows<T>>& dp,
                      const std::vector<Rows<T>>& carry, const std::vector<Rows<T>>& S,
                      const std::vector<bool>& from_p) {
  constexpr int64_t V = Vec<T>::size();
  const Vec<T> one(T(1));
  at::parallel_for(0, B, grain(2 * H * (last - first)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < H; j += V) {
        const int64_t n = std::min(V, H - j);
        auto s = Vec<T>::loadu(S[first].row(b) + j, n);
        for (int64_t i = first; i < last; ++i) {
          const T* pr = pre[i].row(b);
          auto h = Vec<T>::loadu(pr + j, n);
          auto g = Vec<T>::loadu(pr + H + j, n);
          if (from_p[i]) {
            h = h.tanh();
            g = sigmoid(g);
          }
          auto diff = h - s;
          auto keep = one - g;
          T* dr = dp[i].row(b);
          (g * (one - h * h)).store(dr + j, n);
          (diff * g * keep).store(dr + H + j, n);
          keep.store(carry[i].row(b) + j, n);
          if (i + 1 < D) {
            s = s + diff * g;
            s.store(S[i + 1].row(b) + j, n);
          }
        }
      }
    }
  });
}

// dp[i] *= a (both halves), carry[i] *= a: a micro-layer's dp and dL/ds^i's first term.
template <typename T>
inline void scale_row(int64_t H, T* dr, T* cr, const T* ar, int64_t j, int64_t n) {
  auto a = Vec<T>::loadu(ar + j, n);
  (Vec<T>::loadu(dr + j, n) * a).store(dr + j, n);
  (Vec<T>::loadu(dr + H + j, n) * a).store(dr + H + j, n);
  (Vec<T>::loadu(cr + j, n) * a).store(cr + j, n);
}

template <typename T>
void scale(int64_t B, int64_t H, Rows<T> dp, Rows<T> carry, Rows<T> a) {
  constexpr int64_t V = Vec<T>::size();
  at::parallel_for(0, B, grain(3 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t j = 0; j < H; j += V)
        scale_row(H, dp.row(b), carry.row(b), a.row(b), j, std::min(V, H - j));
  });
}

// dL/ds^i = carry[i] + (dp_H R_H) m0 + (dp_T R_T) m1  (or + (dp R) m, or + dp R), then
// the next micro-layer's scale by it (when there is one: dp_next non-null).
template <typename T>
void combine(int64_t B, int64_t H, Rows<T> carry, Rows<T> prod0, Rows<T> prod1, Masks<T> m,
             Rows<T> ds, Rows<T> dp_next, Rows<T> carry_next) {
  constexpr int64_t V = Vec<T>::size();
  at::parallel_for(0, B, grain(4 * H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* m0 = m.m0 ? m.m0 + b * m.ld : nullptr;
      const T* m1 = m.m1 ? m.m1 + b * m.ld : nullptr;
      for (int64_t j = 0; j < H; j += V) {
        const int64_t n = std::min(V, H - j);
        auto term = Vec<T>::loadu(prod0.row(b) + j, n);
        if (m0) term = term * Vec<T>::loadu(m0 + j, n);
        auto a = Vec<T>::loadu(carry.row(b) + j, n) + term;
        if (m1) a = a + Vec<T>::loadu(prod1.row(b) + j, n) * Vec<T>::loadu(m1 + j, n);
        a.store(ds.row(b) + j, n);
        if (dp_next.data) scale_row(H, dp_next.row(b), carry_next.row(b), ds.row(b), j, n);
      }
    }
  });
}

// --- transposes ------------------------------------------------------------------
//
// The backward's weight-gradient products dR^i = dp^T (s^i * m_h) run fastest through
// oneDNN with both operands column-major (dp^T [2H, N] as the left operand, (s * m)^T
// [H, N] packed as the weight), so each step's rows are also written into column-major
// chunk buffers; the transposed copy of the recurrent weights goes through here too.

// dst[j * ldd + b] = src[b * lds + j] (* mul[b][j]) for b < rows <= 16, j < cols <= 16
// (mul: a row pointer per source row, or none).
template <typename T>
inline void transpose_tile(const T* src, int64_t lds, const T* const* mul, int64_t rows,
                           int64_t cols, T* dst, int64_t ldd) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t b = 0; b < rows; ++b)
      dst[j * ldd + b] = mul ? src[b * lds + j] * mul[b][j] : src[b * lds + j];
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 x 16 in registers (unpack, 64-bit shuffle, two 128-bit lane shuffles), partial
// tiles through masked loads and stores.
template <>
__attribute__((always_inline)) inline void transpose_tile<float>(
    const float* src, int64_t lds, const float* const* mul, int64_t rows, int64_t cols,
    float* dst, int64_t ldd) {
  const __mmask16 in_mask = cols == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 out_mask = rows == 16 ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  __m512 r[16], t[16];
  if (rows == 16 && cols == 16 && !mul) {
    for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(src + k * lds);
  } else {
    for (int k = 0; k < 16; ++k) {
      r[k] = k < rows ? _mm512_maskz_loadu_ps(in_mask, src + k * lds) : _mm512_setzero_ps();
      if (mul && k < rows) r[k] = _mm512_mul_ps(r[k], _mm512_maskz_loadu_ps(in_mask, mul[k]));
    }
  }
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], 0xEE);
    r[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8)
    for (int k = 0; k < 4; ++k) {
      t[h + k] = _mm512_shuffle_f32x4(r[h + k], r[h + k + 4], 0x88);
      t[h + k + 4] = _mm512_shuffle_f32x4(r[h + k], r[h + k + 4], 0xDD);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
  }
  const bool lines = ((reinterpret_cast<uintptr_t>(dst) | (ldd * sizeof(float))) & 63) == 0;
  if (rows == 16 && cols == 16 && lines) {  // whole cache lines: past the caches
    for (int k = 0; k < 16; ++k) _mm512_stream_ps(dst + k * ldd, r[k]);
  } else if (rows == 16 && cols == 16) {
    for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ldd, r[k]);
  } else {
    for (int64_t j = 0; j < cols; ++j) _mm512_mask_storeu_ps(dst + j * ldd, out_mask, r[j]);
  }
}
#endif

// Non-temporal stores are weakly ordered: fence them before another thread (or the
// products that read the columns) can look.
inline void fence_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// The [rows, cols] block at src (row stride lds) transposed into dst (row stride ldd),
// column blocks [begin, end) of 16, each through all rows, so that every destination
// row is written in one contiguous run. With mul, source row b is first multiplied by
// mul row b % period (row stride ldm): the state mask of the row's batch entry.
template <typename T>
void transpose_columns(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst,
                       int64_t ldd, int64_t begin, int64_t end, const T* mul = nullptr,
                       int64_t ldm = 0, int64_t period = 1) {
  const T* mul_rows[16];
  for (int64_t block = begin; block < end; ++block) {
    const int64_t j = block * 16, nj = std::min<int64_t>(16, cols - j);
    for (int64_t b = 0; b < rows; b += 16) {
      const int64_t nb = std::min<int64_t>(16, rows - b);
      if (mul)
        for (int64_t k = 0; k < nb; ++k) mul_rows[k] = mul + ((b + k) % period) * ldm + j;
      transpose_tile<T>(src + b * lds + j, lds, mul ? mul_rows : nullptr, nb, nj,
                        dst + j * ldd + b, ldd);
    }
  }
}

// dst[..., j, i] = src[..., i, j]: [n, m] matrices (or a batch of them) with unit column
// stride into [m, n] ones, split over column blocks.
void transpose_into(Tensor dst, const Tensor& src) {
  TORCH_CHECK(src.dim() >= 2 && dst.dim() == src.dim() && src.stride(-1) == 1 &&
                  dst.stride(-1) == 1 && dst.size(-1) == src.size(-2) &&
                  dst.size(-2) == src.size(-1) && dst.scalar_type() == src.scalar_type(),
              "rhn_native: transpose_into(dst [..., m, n], src [..., n, m]), unit column strides");
  const auto s3 = src.reshape({-1, src.size(-2), src.size(-1)});
  auto d3 = dst.view({-1, dst.size(-2), dst.size(-1)});
  const int64_t count = s3.size(0), n = s3.size(1), m = s3.size(2);
  const int64_t blocks = (m + 15) / 16;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "rhn_transpose", [&] {
    const scalar_t* from = s3.data_ptr<scalar_t>();
    scalar_t* to = d3.data_ptr<scalar_t>();
    at::parallel_for(0, count * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / blocks, block = task % blocks;
        transpose_columns<scalar_t>(from + k * s3.stride(0), s3.stride(1), n, m,
                                    to + k * d3.stride(0), d3.stride(1), block, block + 1);
      }
      fence_streaming_stores();
    });
  });
}

// Hands the whole pages inside a contiguous tensor's memory back to the system
// (MADV_DONTNEED: they read as zeros when touched again, and cost a page fault each
// then), for a buffer whose contents are dead but which is kept for reuse: the
// backward's p, once its steps are done, in windows too large to keep all of p.
// Returns the bytes released (0 where the system has no such call).
int64_t release(const Tensor& tensor) {
  TORCH_CHECK(tensor.is_contiguous() && tensor.device().is_cpu(),
              "rhn_native: release a contiguous CPU tensor");
#if defined(__linux__)
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(tensor.data_ptr());
  const auto first = (begin + page - 1) / page * page;
  const auto last = (begin + tensor.nbytes()) / page * page;
  if (last > first && madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) == 0)
    return static_cast<int64_t>(last - first);
#endif
  return 0;
}

enum MaskKind { kNone, kShared, kSeparate };

MaskKind mask_kind(const c10::optional<Tensor>& mask) {
  if (!mask.has_value() || !mask->defined()) return kNone;
  return mask->dim() == 2 ? kShared : kSeparate;
}

template <typename T>
Masks<T> masks_of(const Tensor& mask, MaskKind kind) {
  if (kind == kNone) return {};
  if (kind == kShared) return {mask.data_ptr<T>(), nullptr, mask.size(1)};
  return {mask.data_ptr<T>(), mask.data_ptr<T>() + mask.size(2), 2 * mask.size(2)};
}

// A product x W^T (+ bias) for a linear weight W [out, in]: through oneDNN with W
// prepacked by mkldnn::_reorder_linear_weight when ``packed`` is defined (a new tensor),
// else ATen's addmm/mm into ``out``. Returns where the result is.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& packed, const Tensor& bias,
              Tensor out) {
  if (packed.defined()) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                       c10::string_view, c10::List<std::optional<c10::Scalar>>,
                                       std::optional<c10::string_view>)>();
    return op.call(x.contiguous(), packed, bias.defined() ? std::optional<Tensor>(bias) : std::nullopt,
                   "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  if (bias.defined())
    at::addmm_out(out, bias, x, weight.t());
  else
    at::mm_out(out, x, weight.t());
  return out;
}

// One micro-layer's weights for the products: W [2H, H] (or its halves with separate
// masks) as linear weights, with their packed forms where given.
struct Linear {
  Tensor weight[2], packed[2], bias[2];
};

// p = b + (s * m) R^T, from the masked copies of s (sm0, sm1) or s itself without mask:
// the results for the H and T halves (views of one [B, 2H] tensor but with separate masks).
std::pair<Tensor, Tensor> preactivation(const Tensor& s, const Tensor& sm0, const Tensor& sm1,
                                        const Linear& layer, MaskKind kind, const Tensor& out) {
  const int64_t H = s.size(1);
  if (kind == kSeparate) {
    auto ph = linear(sm0, layer.weight[0], layer.packed[0], layer.bias[0], out.narrow(1, 0, H));
    auto pt = linear(sm1, layer.weight[1], layer.packed[1], layer.bias[1], out.narrow(1, H, H));
    return {ph, pt};
  }
  auto p = linear(kind == kShared ? sm0 : s, layer.weight[0], layer.packed[0], layer.bias[0], out);
  return {p.narrow(1, 0, H), p.narrow(1, H, H)};
}

std::vector<Linear> layers_of(const Tensor& weight, const Tensor& bias,
                              const std::vector<Tensor>& packed, MaskKind kind) {
  const int64_t D = weight.size(0), H = weight.size(2);
  const int64_t parts = kind == kSeparate ? 2 : 1;
  std::vector<Linear> layers(D);
  for (int64_t i = 0; i < D; ++i) {
    auto w = weight.select(0, i);
    auto b = bias.defined() ? bias.select(0, i) : Tensor();
    for (int64_t k = 0; k < parts; ++k) {
      layers[i].weight[k] = parts == 1 ? w : w.narrow(0, k * H, H);
      layers[i].bias[k] = !b.defined() ? b : (parts == 1 ? b : b.narrow(0, k * H, H));
      if (!packed.empty()) layers[i].packed[k] = packed.at(i * parts + k);
    }
  }
  return layers;
}

void mask_into(const Tensor& s, const Tensor& mask, MaskKind kind, Tensor& sm0, Tensor& sm1) {
  if (kind == kShared) at::mul_out(sm0, s, mask);
  if (kind == kSeparate) {
    at::mul_out(sm0, s, mask.select(1, 0));
    at::mul_out(sm1, s, mask.select(1, 1));
  }
}

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& projected_in, const Tensor& state_in,
                                 const Tensor& weight, const Tensor& bias,
                                 const c10::optional<Tensor>& mask_in, double z, bool training,
                                 const c10::optional<Tensor>& pre,
                                 const c10::optional<Tensor>& keep,
                                 const std::vector<bool>& recomputed,
                                 const std::vector<Tensor>& packed) {
  const auto projected = projected_in.contiguous();
  const auto state = state_in.contiguous();
  const int64_t B = projected.size(0), T_ = projected.size(1), W = projected.size(2);
  const int64_t D = weight.size(0), H = weight.size(2);
  const MaskKind kind = mask_kind(mask_in);
  const Tensor mask = kind == kNone ? Tensor() : mask_in->contiguous();
  const auto m = masks_of<T>(mask, kind);
  const auto opts = projected.options();
  const auto layers = layers_of(weight, bias, packed, kind);
  auto outputs = at::empty({B, T_, H}, opts);
  auto scratch = at::empty({B, W}, opts);
  Tensor buffers[2] = {at::empty({B, H}, opts), at::empty({B, H}, opts)};
  auto last = z > 0 ? at::empty({B, H}, opts) : Tensor();
  Tensor sm0, sm1;
  if (kind != kNone) sm0 = at::empty({B, H}, opts);
  if (kind == kSeparate) sm1 = at::empty({B, H}, opts);
  std::vector<int64_t> slot(D, -1);  // layer -> index into pre, -1: scratch
  if (pre.has_value()) {
    int64_t kept = 0;
    for (int64_t i = 0; i < D; ++i)
      if (!recomputed[i]) slot[i] = kept++;
  }

  Tensor previous = state;
  mask_into(previous, mask, kind, sm0, sm1);
  for (int64_t t = 0; t < T_; ++t) {
    auto x = projected.select(1, t);
    auto out_t = outputs.select(1, t);
    Tensor s = previous;
    for (int64_t i = 0; i < D; ++i) {
      auto p = slot[i] >= 0 ? pre->select(0, slot[i]).select(0, t) : scratch;
      auto [ph, pt] = preactivation(s, sm0, sm1, layers[i], kind, p);
      const bool final_layer = i + 1 == D;
      Tensor dest = !final_layer ? buffers[i % 2] : (z > 0 ? last : out_t);
      // The next product's masked input; after the last layer only without zoneout
      // (zoneout changes s first) and when there is a next step.
      const bool masked = kind != kNone && (!final_layer || (z == 0 && t + 1 < T_));
      gate_forward<T>(B, H, rows<T>(ph), rows<T>(pt), rows<T>(p),
                      i == 0 ? rows<T>(x) : Rows<T>{}, rows<T>(s), rows<T>(dest), m,
                      masked ? rows<T>(sm0) : Rows<T>{},
                      masked && kind == kSeparate ? rows<T>(sm1) : Rows<T>{});
      s = dest;
    }
    if (z > 0) {  // as rhn_cli.models.zoneout, with the draw kept for the backward
      if (training) {
        auto keep_old = at::rand_like(last) < z;
        if (keep.has_value()) keep->select(1, t).copy_(keep_old);
        at::where_out(out_t, keep_old, previous, last);
      } else {
        at::add_out(out_t, previous * z, last * (1.0 - z));
      }
      if (t + 1 < T_) mask_into(out_t, mask, kind, sm0, sm1);
    }
    previous = out_t;
  }
  return {outputs, previous.clone()};
}

template <typename T>
Tensor backward_impl(int64_t start, int64_t end, Tensor ds, const Tensor& d_outputs,
                     const Tensor& state, const Tensor& operands, const Tensor& weight,
                     const Tensor& bias, const c10::optional<Tensor>& mask_in,
                     const Tensor& pre, const Tensor& outputs, const c10::optional<Tensor>& keep,
                     double z, bool training, const std::vector<bool>& recomputed,
                     const Tensor& dps, const Tensor& states, const Tensor& carry,
                     const std::vector<Tensor>& packed, const std::vector<Tensor>& packed_forward,
                     const c10::optional<Tensor>& dp_columns,
                     const c10::optional<Tensor>& state_columns,
                     const c10::optional<Tensor>& d_projected, bool dp_over_p) {
  const int64_t D = weight.size(0), H = weight.size(2), B = outputs.size(0);
  // The rows dp^i_t and s^i_t of steps t in [start, end) go into dps and states
  // [D, G, B, .], slot (t - start) % G: all K steps of the chunk (G = K), or a group of
  // G steps at a time that the column buffers ([D, 2H, N] and [D, H, N], N = K B) then
  // take as columns (t - start) B ...: a run of G B numbers per column row, written
  // when the group's first step is done (cache lines filled in one go, where B numbers
  // per step would touch each line again, long after it left the cache).
  // With dp_over_p, a kept layer's dp^i_t goes where its gates were (its step needs
  // them no more once read: the same pass reads the gates and writes dp), and dps
  // holds the recomputed layers' only (their p is recomputed into it).
  const int64_t group = states.size(1);
  const bool columns = dp_columns.has_value() && dp_columns->defined();
  int64_t recomputed_count = 0;
  for (int64_t i = 0; i < D; ++i) recomputed_count += recomputed[i];
  TORCH_CHECK(dps.size(0) == (dp_over_p ? recomputed_count : D) && dps.size(1) == group &&
                  dps.is_contiguous() && states.is_contiguous() && pre.is_contiguous(),
              "rhn_native: dps [D (or the recomputed layers), G, B, 2H], states [D, G, B, H]"
              " and pre, contiguous");
  TORCH_CHECK(!columns || (state_columns.has_value() && state_columns->defined() &&
                           dp_columns->is_contiguous() && state_columns->is_contiguous()),
              "rhn_native: dp and state columns come together, contiguous");
  const MaskKind kind = mask_kind(mask_in);
  const Tensor mask = kind == kNone ? Tensor() : mask_in->contiguous();
  const auto m = masks_of<T>(mask, kind);
  const auto opts = outputs.options();
  const int64_t parts = kind == kSeparate ? 2 : 1;
  // dL/ds^i's product dp R^i = dp (R^i^T)^T: linear weights R^i^T [H, 2H], or with
  // separate masks dp_H R_H + dp_T R_T (in-dimension halves).
  std::vector<Linear> down(D);
  for (int64_t i = 0; i < D; ++i) {
    auto ops = operands.select(0, i);
    for (int64_t k = 0; k < parts; ++k) {
      down[i].weight[k] = (parts == 1 ? ops : ops.narrow(0, k * H, H)).t();
      if (!packed.empty()) down[i].packed[k] = packed.at(i * parts + k);
    }
  }
  std::vector<Tensor> recompute_packed;  // packed_forward holds the recomputed layers' only
  if (!packed_forward.empty()) {
    recompute_packed.resize(D * parts);
    int64_t next = 0;
    for (int64_t i = 0; i < D; ++i)
      if (recomputed[i])
        for (int64_t k = 0; k < parts; ++k) recompute_packed[i * parts + k] = packed_forward.at(next++);
  }
  std::vector<Linear> up = layers_of(weight, bias, {}, kind);
  if (!recompute_packed.empty())
    for (int64_t i = 0; i < D; ++i)
      for (int64_t k = 0; k < parts; ++k) up[i].packed[k] = recompute_packed[i * parts + k];
  Tensor prod[2] = {at::empty({B, H}, opts), kind == kSeparate ? at::empty({B, H}, opts) : Tensor()};
  Tensor sm0 = kind != kNone ? at::empty({B, H}, opts) : Tensor();
  Tensor sm1 = kind == kSeparate ? at::empty({B, H}, opts) : Tensor();
  Tensor ds_buffers[2] = {at::empty({B, H}, opts), at::empty({B, H}, opts)};
  std::vector<int64_t> slot(D, -1), staged(D, -1);  // layer -> index into pre, into dps
  {
    int64_t kept = 0, other = 0;
    for (int64_t i = 0; i < D; ++i) {
      if (!recomputed[i]) slot[i] = kept++;
      if (!dp_over_p) staged[i] = i;
      else if (recomputed[i]) staged[i] = other++;
    }
  }
  // Layer i's dp rows of step t (and, being contiguous in t, of the steps after it).
  auto dp_home = [&](int64_t i, int64_t t) -> T* {
    if (staged[i] < 0) return pre.data_ptr<T>() + (slot[i] * pre.size(1) + t) * B * 2 * H;
    return dps.data_ptr<T>() + (staged[i] * group + (t - start) % group) * B * 2 * H;
  };
  auto dp_tensor = [&](int64_t i, int64_t t) {  // the same [B, 2H] rows as a tensor
    if (staged[i] < 0) return pre.select(0, slot[i]).select(0, t);
    return dps.select(0, staged[i]).select(0, (t - start) % group);
  };
  std::vector<Rows<T>> carry_rows(D), pre_rows(D), dp_rows(D), S_rows(D);
  for (int64_t i = 0; i < D; ++i) carry_rows[i] = rows<T>(carry.select(0, i));

  for (int64_t t = end - 1; t >= start; --t) {
    const int64_t place = (t - start) % group;
    auto S = states.select(1, place);  // [D, B, H]
    S.select(0, 0).copy_(t == 0 ? state : outputs.select(1, t - 1));
    for (int64_t i = 0; i < D; ++i) {
      dp_rows[i] = {dp_home(i, t), 2 * H};
      S_rows[i] = rows<T>(S.select(0, i));
      pre_rows[i] = slot[i] >= 0 ? rows<T>(pre.select(0, slot[i]).select(0, t)) : dp_rows[i];
    }
    // The states s^i, exactly as the forward made them: segments of kept layers, each
    // recomputed layer's p first computed again from its s^i by the forward's product.
    for (int64_t first = 0; first < D;) {
      int64_t last = first + 1;
      while (last < D && !recomputed[last]) ++last;
      if (recomputed[first]) {
        auto s = S.select(0, first);
        auto p = dps.select(0, staged[first]).select(0, place);
        mask_into(s, mask, kind, sm0, sm1);
        auto [ph, pt] = preactivation(s, sm0, sm1, up[first], kind, p);
        if (ph.data_ptr() != p.data_ptr()) {  // a packed product's new tensor
          p.narrow(1, 0, H).copy_(ph);
          p.narrow(1, H, H).copy_(pt);
        }
      }
      gate_reconstruct<T>(B, H, D, first, last, pre_rows, dp_rows, carry_rows, S_rows,
                          recomputed);
      first = last;
    }
    Tensor kept_part;
    if (z > 0) {  // split dL/ds_t between the new state s^D_t and the kept s_{t-1}
      if (training) {
        auto k = keep->select(1, t);
        kept_part = at::where(k, ds, 0.0);
        ds = at::where(k, 0.0, ds);
      } else {
        kept_part = z * ds;
        ds = (1.0 - z) * ds;
      }
    }
    ds = ds.contiguous();
    scale<T>(B, H, dp_rows[D - 1], carry_rows[D - 1], rows<T>(ds));
    for (int64_t i = D - 1; i >= 0; --i) {
      auto dpi = dp_tensor(i, t);
      Tensor r0, r1;
      if (kind == kSeparate) {
        r0 = linear(dpi.narrow(1, 0, H), down[i].weight[0], down[i].packed[0], Tensor(), prod[0]);
        r1 = linear(dpi.narrow(1, H, H), down[i].weight[1], down[i].packed[1], Tensor(), prod[1]);
      } else {
        r0 = linear(dpi, down[i].weight[0], down[i].packed[0], Tensor(), prod[0]);
      }
      Tensor& next = ds_buffers[i % 2];
      combine<T>(B, H, carry_rows[i], rows<T>(r0), r1.defined() ? rows<T>(r1) : Rows<T>{}, m,
                 rows<T>(next), i > 0 ? dp_rows[i - 1] : Rows<T>{},
                 i > 0 ? carry_rows[i - 1] : Rows<T>{});
      ds = next;
    }
    if (columns && place == 0) {  // the group's dp^i and s^i * m_h (shared mask) as columns
      const int64_t N = dp_columns->size(2), column = (t - start) * B;
      const int64_t count = std::min(group, end - t) * B;  // rows: (step, b) in order
      T* dp_out = dp_columns->data_ptr<T>() + column;
      T* s_out = state_columns->data_ptr<T>() + column;
      const T* s_in = states.data_ptr<T>();
      const int64_t dp_blocks = (2 * H + 15) / 16, s_blocks = (H + 15) / 16;
      at::parallel_for(0, D * (dp_blocks + s_blocks), 1, [&](int64_t begin, int64_t finish) {
        for (int64_t task = begin; task < finish; ++task) {
          const int64_t i = task / (dp_blocks + s_blocks), block = task % (dp_blocks + s_blocks);
          if (block < dp_blocks) {
            transpose_columns<T>(dp_home(i, t), 2 * H, count, 2 * H,
                                 dp_out + i * 2 * H * N, N, block, block + 1);
          } else {
            transpose_columns<T>(s_in + i * states.stride(0), H, count, H, s_out + i * H * N, N,
                                 block - dp_blocks, block - dp_blocks + 1,
                                 kind == kShared ? m.m0 : nullptr, m.ld, B);
          }
        }
        fence_streaming_stores();
      });
    }
    if (d_projected.has_value() && d_projected->defined())  // dL/dprojected_t = dp^0_t
      d_projected->select(1, t).copy_(dp_tensor(0, t));
    ds = ds.clone();  // the buffers are reused by the next step
    if (z > 0) ds.add_(kept_part);
    if (t > 0) ds.add_(d_outputs.select(1, t - 1));
  }
  return ds;
}

std::vector<bool> layer_flags(int64_t depth, const std::vector<int64_t>& recomputed) {
  std::vector<bool> flags(depth, false);
  for (auto i : recomputed) flags.at(i) = true;
  return flags;
}

std::vector<Tensor> forward(const Tensor& projected, const Tensor& state, const Tensor& weight,
                            const Tensor& bias, const c10::optional<Tensor>& mask, double z,
                            bool training, const c10::optional<Tensor>& pre,
                            const c10::optional<Tensor>& keep, std::vector<int64_t> recomputed,
                            std::vector<Tensor> packed) {
  at::NoGradGuard no_grad;
  const auto flags = layer_flags(weight.size(0), recomputed);
  return AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "rhn_forward", [&] {
    return forward_impl<scalar_t>(projected, state, weight, bias, mask, z, training, pre, keep,
                                  flags, packed);
  });
}

Tensor backward(int64_t start, int64_t end, const Tensor& ds, const Tensor& d_outputs,
                const Tensor& state, const Tensor& operands, const Tensor& weight,
                const Tensor& bias, const c10::optional<Tensor>& mask, const Tensor& pre,
                const Tensor& outputs, const c10::optional<Tensor>& keep, double z,
                bool training, std::vector<int64_t> recomputed, const Tensor& dps,
                const Tensor& states, const Tensor& carry, std::vector<Tensor> packed,
                std::vector<Tensor> packed_forward, const c10::optional<Tensor>& dp_columns,
                const c10::optional<Tensor>& state_columns,
                const c10::optional<Tensor>& d_projected, bool dp_over_p) {
  at::NoGradGuard no_grad;
  const auto flags = layer_flags(weight.size(0), recomputed);
  return AT_DISPATCH_FLOATING_TYPES(ds.scalar_type(), "rhn_backward", [&] {
    return backward_impl<scalar_t>(start, end, ds, d_outputs, state, operands, weight, bias, mask,
                                   pre, outputs, keep, z, training, flags, dps, states, carry,
                                   packed, packed_forward, dp_columns, state_columns,
                                   d_projected, dp_over_p);
  });
}

// --- softmax cross-entropy (rhn_cli.engine.objective's training loss) -------------
//
// Forward: lse_n = log sum_v exp(x_nv) per row, and the summed loss
// sum_n (lse_n - x_n,t_n) over rows whose target is not ``ignore``. Backward: the
// gradient scale * (softmax(x_n) - onehot(t_n)) (zero for ignored rows), written
// column-major, [V, N]: the layout in which the output layer's weight-gradient product
// dlogits^T x takes it without a transposed copy (28 MB at ptb_sota).

template <typename T, typename F>
T horizontal(const Vec<T>& lanes, F combine) {  // combine over a vector's lanes
  T values[Vec<T>::size()];
  lanes.store(values);
  T result = values[0];
  for (int64_t k = 1; k < Vec<T>::size(); ++k) result = combine(result, values[k]);
  return result;
}

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

std::vector<Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& targets,
                                          int64_t ignore) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "rhn_native: logits [N, V], contiguous");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.is_contiguous() &&
                  targets.scalar_type() == at::kLong,
              "rhn_native: targets [N], int64");
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

// --- SGD with the L2 term and clipping (rhn_cli.engine.optim.penalised_step) --------
//
// Pass 1: sum p^2 and sum (g + wd p)^2 over every parameter, one read of p and g; pass 2:
// p -= step (g + wd p). The Python path's four passes (the penalty's norm, g += wd p, the
// gradient's norm, the SGD update) read and write about 1.6 times as much memory.

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
  TORCH_CHECK(params.size() == grads.size(), "rhn_native: one gradient per parameter");
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(params[k].is_contiguous() && grads[k].is_contiguous() &&
                    params[k].numel() == grads[k].numel() &&
                    params[k].scalar_type() == grads[k].scalar_type(),
                "rhn_native: contiguous parameters with gradients of their size and dtype");
  }
}

// (sum of p^2, sum of (g + wd p)^2) over all pairs, in double.
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &forward, "RHN recurrence forward (see rhn_fast.py)");
  module.def("backward", &backward, "RHN recurrence backward over steps [start, end)");
  module.def("transpose_into", &transpose_into, "dst[..., j, i] = src[..., i, j]");
  module.def("release", &release, "give a dead tensor's whole pages back to the system");
  module.def("cross_entropy_forward", &cross_entropy_forward,
             "summed softmax cross-entropy and the rows' log-sum-exp");
  module.def("cross_entropy_backward", &cross_entropy_backward,
             "its gradient, scale * (softmax - onehot), as a [V, N] (column-major) tensor");
  module.def("l2_squares", &l2_squares, "(sum p^2, sum (g + wd p)^2) over parameters");
  module.def("l2_sgd_update", &l2_sgd_update, "p -= step (g + wd p) for every parameter");
}
