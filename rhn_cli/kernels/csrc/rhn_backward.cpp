// The RHN recurrence's backward time loop, one chunk of steps per call; see
// rhn_recurrence.h, and rhn_recurrence.py's docstring for the equations.
#include "rhn_recurrence.h"
#include "transpose.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>

namespace rhn {
namespace {

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

// One call's backward over steps [start, end), step by step from the last.
//
// The rows dp^i_t and s^i_t of steps t in [start, end) go into work.dps and work.states
// [D, G, B, .], slot (t - start) % G: all K steps of the chunk (G = K), or a group of G
// steps at a time that the column buffers ([D, 2H, N] and [D, H, N], N = K B) then take
// as columns (t - start) B ...: a run of G B numbers per column row, written when the
// group's first step is done (cache lines filled in one go, where B numbers per step
// would touch each line again, long after it left the cache).
// With dp_over_p, a kept layer's dp^i_t goes where its gates were (its step needs them no
// more once read: the same pass reads the gates and writes dp), and dps holds the
// recomputed layers' only (their p is recomputed into it).
template <typename T>
class BackwardLoop {
 public:
  BackwardLoop(const Layer& layer, const Kept& kept, const BackwardProducts& products,
               const Workspace& work, int64_t start)
      : layer_(layer), kept_(kept), work_(work), start_(start) {
    D_ = layer.weight.size(0);
    H_ = layer.weight.size(2);
    B_ = kept.outputs.size(0);
    group_ = work.states.size(1);
    columns_ = work.dp_columns.defined();
    check_shapes();
    kind_ = mask_kind(layer.mask);
    mask_ = kind_ == kNone ? Tensor() : layer.mask.contiguous();
    m_ = masks_of<T>(mask_, kind_);
    set_up_products(products);
    const auto opts = kept.outputs.options();
    prod_[0] = at::empty({B_, H_}, opts);
    if (kind_ == kSeparate) prod_[1] = at::empty({B_, H_}, opts);
    if (kind_ != kNone) sm0_ = at::empty({B_, H_}, opts);
    if (kind_ == kSeparate) sm1_ = at::empty({B_, H_}, opts);
    ds_buffers_[0] = at::empty({B_, H_}, opts);
    ds_buffers_[1] = at::empty({B_, H_}, opts);
    set_up_slots();
    carry_rows_.resize(D_);
    pre_rows_.resize(D_);
    dp_rows_.resize(D_);
    S_rows_.resize(D_);
    for (int64_t i = 0; i < D_; ++i) carry_rows_[i] = rows<T>(work.carry.select(0, i));
  }

  Tensor run(int64_t end, Tensor ds) {
    for (int64_t t = end - 1; t >= start_; --t) {
      const int64_t place = (t - start_) % group_;
      reconstruct(t, place);
      Tensor kept_part;
      if (layer_.z > 0) kept_part = split_zoneout(t, ds);
      ds = propagate(t, ds.contiguous());
      if (columns_ && place == 0) write_columns(t, end);
      if (work_.d_projected.defined())  // dL/dprojected_t = dp^0_t
        work_.d_projected.select(1, t).copy_(dp_tensor(0, t));
      ds = ds.clone();  // the buffers are reused by the next step
      if (layer_.z > 0) ds.add_(kept_part);
      if (t > 0) ds.add_(work_.d_outputs.select(1, t - 1));
    }
    return ds;
  }

 private:
  void check_shapes() const {
    int64_t recomputed_count = 0;
    for (int64_t i = 0; i < D_; ++i) recomputed_count += kept_.recomputed[i];
    const Tensor& dps = work_.dps;
    TORCH_CHECK(dps.size(0) == (work_.dp_over_p ? recomputed_count : D_) &&
                    dps.size(1) == group_ && dps.is_contiguous() &&
                    work_.states.is_contiguous() && kept_.pre.is_contiguous(),
                "rhn native kernels: dps [D (or the recomputed layers), G, B, 2H], states "
                "[D, G, B, H] and pre, contiguous");
    TORCH_CHECK(!columns_ || (work_.state_columns.defined() && work_.dp_columns.is_contiguous() &&
                              work_.state_columns.is_contiguous()),
                "rhn native kernels: dp and state columns come together, contiguous");
  }

  // dL/ds^i's product dp R^i = dp (R^i^T)^T: linear weights R^i^T [H, 2H], or with
  // separate masks dp_H R_H + dp_T R_T (in-dimension halves); and the recomputed
  // layers' forward products (packed_forward holds theirs only).
  void set_up_products(const BackwardProducts& products) {
    const int64_t parts = kind_ == kSeparate ? 2 : 1;
    down_.resize(D_);
    for (int64_t i = 0; i < D_; ++i) {
      auto ops = products.operands.select(0, i);
      for (int64_t k = 0; k < parts; ++k) {
        down_[i].weight[k] = (parts == 1 ? ops : ops.narrow(0, k * H_, H_)).t();
        if (!products.packed.empty()) down_[i].packed[k] = products.packed.at(i * parts + k);
      }
    }
    up_ = layers_of(layer_.weight, layer_.bias, {}, kind_);
    if (products.packed_forward.empty()) return;
    int64_t next = 0;
    for (int64_t i = 0; i < D_; ++i)
      if (kept_.recomputed[i])
        for (int64_t k = 0; k < parts; ++k) up_[i].packed[k] = products.packed_forward.at(next++);
  }

  void set_up_slots() {  // layer -> index into pre, into dps
    slot_.assign(D_, -1);
    staged_.assign(D_, -1);
    int64_t kept = 0, other = 0;
    for (int64_t i = 0; i < D_; ++i) {
      if (!kept_.recomputed[i]) slot_[i] = kept++;
      if (!work_.dp_over_p)
        staged_[i] = i;
      else if (kept_.recomputed[i])
        staged_[i] = other++;
    }
  }

  // Layer i's dp rows of step t (and, being contiguous in t, of the steps after it).
  T* dp_home(int64_t i, int64_t t) const {
    const int64_t width = 2 * H_;
    if (staged_[i] < 0)
      return kept_.pre.data_ptr<T>() + (slot_[i] * kept_.pre.size(1) + t) * B_ * width;
    return work_.dps.data_ptr<T>() + (staged_[i] * group_ + (t - start_) % group_) * B_ * width;
  }

  Tensor dp_tensor(int64_t i, int64_t t) const {  // the same [B, 2H] rows as a tensor
    if (staged_[i] < 0) return kept_.pre.select(0, slot_[i]).select(0, t);
    return work_.dps.select(0, staged_[i]).select(0, (t - start_) % group_);
  }

  // The states s^i of step t, exactly as the forward made them, and dp / carry from the
  // gates: segments of kept layers, each recomputed layer's p first computed again from
  // its s^i by the forward's product.
  void reconstruct(int64_t t, int64_t place) {
    auto S = work_.states.select(1, place);  // [D, B, H]
    S.select(0, 0).copy_(t == 0 ? layer_.state : kept_.outputs.select(1, t - 1));
    for (int64_t i = 0; i < D_; ++i) {
      dp_rows_[i] = {dp_home(i, t), 2 * H_};
      S_rows_[i] = rows<T>(S.select(0, i));
      pre_rows_[i] =
          slot_[i] >= 0 ? rows<T>(kept_.pre.select(0, slot_[i]).select(0, t)) : dp_rows_[i];
    }
    const auto& recomputed = kept_.recomputed;
    for (int64_t first = 0; first < D_;) {
      int64_t last = first + 1;
      while (last < D_ && !recomputed[last]) ++last;
      if (recomputed[first]) {
        auto s = S.select(0, first);
        auto p = work_.dps.select(0, staged_[first]).select(0, place);
        mask_into(s, mask_, kind_, sm0_, sm1_);
        auto [ph, pt] = preactivation(s, sm0_, sm1_, up_[first], kind_, p);
        if (ph.data_ptr() != p.data_ptr()) {  // a packed product's new tensor
          p.narrow(1, 0, H_).copy_(ph);
          p.narrow(1, H_, H_).copy_(pt);
        }
      }
      gate_reconstruct<T>(B_, H_, D_, first, last, pre_rows_, dp_rows_, carry_rows_, S_rows_,
                          recomputed);
      first = last;
    }
  }

  // Zoneout splits dL/ds_t between the new state s^D_t (ds, changed here) and the kept
  // s_{t-1} (returned).
  Tensor split_zoneout(int64_t t, Tensor& ds) const {
    const double z = layer_.z;
    if (layer_.training) {
      auto k = kept_.keep.select(1, t);
      auto kept_part = at::where(k, ds, 0.0);
      ds = at::where(k, 0.0, ds);
      return kept_part;
    }
    auto kept_part = ds.mul(z);
    ds = ds.mul(1.0 - z);
    return kept_part;
  }

  // From a = dL/ds^D_t down through the micro-layers: dp^i *= a, then dL/ds^i; returns
  // dL/ds^0_t (in one of the ds buffers).
  Tensor propagate(int64_t t, Tensor ds) {
    scale<T>(B_, H_, dp_rows_[D_ - 1], carry_rows_[D_ - 1], rows<T>(ds));
    for (int64_t i = D_ - 1; i >= 0; --i) {
      auto dpi = dp_tensor(i, t);
      Tensor r0, r1;
      if (kind_ == kSeparate) {
        r0 = linear(dpi.narrow(1, 0, H_), down_[i].weight[0], down_[i].packed[0], Tensor(),
                    prod_[0]);
        r1 = linear(dpi.narrow(1, H_, H_), down_[i].weight[1], down_[i].packed[1], Tensor(),
                    prod_[1]);
      } else {
        r0 = linear(dpi, down_[i].weight[0], down_[i].packed[0], Tensor(), prod_[0]);
      }
      Tensor& next = ds_buffers_[i % 2];
      combine<T>(B_, H_, carry_rows_[i], rows<T>(r0), r1.defined() ? rows<T>(r1) : Rows<T>{},
                 m_, rows<T>(next), i > 0 ? dp_rows_[i - 1] : Rows<T>{},
                 i > 0 ? carry_rows_[i - 1] : Rows<T>{});
      ds = next;
    }
    return ds;
  }

  // The group's dp^i and s^i * m_h (shared mask) as columns, from step t on.
  void write_columns(int64_t t, int64_t end) {
    const int64_t N = work_.dp_columns.size(2), column = (t - start_) * B_;
    const int64_t count = std::min(group_, end - t) * B_;  // rows: (step, b) in order
    T* dp_out = work_.dp_columns.data_ptr<T>() + column;
    T* s_out = work_.state_columns.data_ptr<T>() + column;
    const T* s_in = work_.states.data_ptr<T>();
    const int64_t s_stride = work_.states.stride(0);
    const int64_t dp_blocks = (2 * H_ + 15) / 16, s_blocks = (H_ + 15) / 16;
    const int64_t H = H_, B = B_;
    const T* shared_mask = kind_ == kShared ? m_.m0 : nullptr;
    at::parallel_for(0, D_ * (dp_blocks + s_blocks), 1, [&](int64_t begin, int64_t finish) {
      for (int64_t task = begin; task < finish; ++task) {
        const int64_t i = task / (dp_blocks + s_blocks), block = task % (dp_blocks + s_blocks);
        if (block < dp_blocks) {
          transpose_columns<T>(dp_home(i, t), 2 * H, count, 2 * H, dp_out + i * 2 * H * N, N,
                               block, block + 1);
        } else {
          transpose_columns<T>(s_in + i * s_stride, H, count, H, s_out + i * H * N, N,
                               block - dp_blocks, block - dp_blocks + 1, shared_mask, m_.ld, B);
        }
      }
      fence_streaming_stores();
    });
  }

  const Layer& layer_;
  const Kept& kept_;
  const Workspace& work_;
  const int64_t start_;
  int64_t D_ = 0, H_ = 0, B_ = 0, group_ = 0;
  bool columns_ = false;
  MaskKind kind_ = kNone;
  Tensor mask_;
  Masks<T> m_;
  std::vector<Linear> down_, up_;
  Tensor prod_[2], sm0_, sm1_, ds_buffers_[2];
  std::vector<int64_t> slot_, staged_;
  std::vector<Rows<T>> carry_rows_, pre_rows_, dp_rows_, S_rows_;
};

}  // namespace

Tensor rhn_backward(const Layer& layer, const Kept& kept, const BackwardProducts& products,
                    const Workspace& work, int64_t start, int64_t end, Tensor ds) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(static_cast<int64_t>(kept.recomputed.size()) == layer.weight.size(0),
              "rhn native kernels: one recomputed flag per micro-layer");
  return AT_DISPATCH_FLOATING_TYPES(ds.scalar_type(), "rhn_backward", [&] {
    return BackwardLoop<scalar_t>(layer, kept, products, work, start).run(end, ds);
  });
}

}  // namespace rhn
