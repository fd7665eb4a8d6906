// The RHN recurrence's forward time loop; see rhn_recurrence.h.
#include "rhn_recurrence.h"

#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rand_like.h>
#include <ATen/ops/where.h>

namespace rhn {
namespace {

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

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& projected_in, const Layer& layer, const Kept& kept,
                                 const std::vector<Tensor>& packed) {
  const auto projected = projected_in.contiguous();
  const auto state = layer.state.contiguous();
  const int64_t B = projected.size(0), T_ = projected.size(1), W = projected.size(2);
  const int64_t D = layer.weight.size(0), H = layer.weight.size(2);
  const double z = layer.z;
  const MaskKind kind = mask_kind(layer.mask);
  const Tensor mask = kind == kNone ? Tensor() : layer.mask.contiguous();
  const auto m = masks_of<T>(mask, kind);
  const auto opts = projected.options();
  const auto layers = layers_of(layer.weight, layer.bias, packed, kind);
  auto outputs = at::empty({B, T_, H}, opts);
  auto scratch = at::empty({B, W}, opts);
  Tensor buffers[2] = {at::empty({B, H}, opts), at::empty({B, H}, opts)};
  auto last = z > 0 ? at::empty({B, H}, opts) : Tensor();
  Tensor sm0, sm1;
  if (kind != kNone) sm0 = at::empty({B, H}, opts);
  if (kind == kSeparate) sm1 = at::empty({B, H}, opts);
  std::vector<int64_t> slot(D, -1);  // layer -> index into pre, -1: scratch
  if (kept.pre.defined()) {
    int64_t index = 0;
    for (int64_t i = 0; i < D; ++i)
      if (!kept.recomputed[i]) slot[i] = index++;
  }

  Tensor previous = state;
  mask_into(previous, mask, kind, sm0, sm1);
  for (int64_t t = 0; t < T_; ++t) {
    auto x = projected.select(1, t);
    auto out_t = outputs.select(1, t);
    Tensor s = previous;
    for (int64_t i = 0; i < D; ++i) {
      auto p = slot[i] >= 0 ? kept.pre.select(0, slot[i]).select(0, t) : scratch;
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
      if (layer.training) {
        auto keep_old = at::rand_like(last).lt(z);
        if (kept.keep.defined()) kept.keep.select(1, t).copy_(keep_old);
        at::where_out(out_t, keep_old, previous, last);
      } else {
        at::add_out(out_t, previous.mul(z), last.mul(1.0 - z));
      }
      if (t + 1 < T_) mask_into(out_t, mask, kind, sm0, sm1);
    }
    previous = out_t;
  }
  return {outputs, previous.clone()};
}

}  // namespace

std::vector<Tensor> rhn_forward(const Tensor& projected, const Layer& layer, const Kept& kept,
                                const std::vector<Tensor>& packed) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(static_cast<int64_t>(kept.recomputed.size()) == layer.weight.size(0),
              "rhn native kernels: one recomputed flag per micro-layer");
  return AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "rhn_forward", [&] {
    return forward_impl<scalar_t>(projected, layer, kept, packed);
  });
}

}  // namespace rhn
