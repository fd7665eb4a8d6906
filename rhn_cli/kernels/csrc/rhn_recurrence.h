// The time loop of an RHN layer's recurrence in C++ (CPU, float32/float64), driven by
// rhn_cli/kernels/rhn_recurrence.py, whose docstring has the equations. Same operations,
// same order, as the Python loop there; what changes is how they run:
//
// - the matrix products are ATen's addmm/mm into preallocated buffers (float64, or when
//   no packed weights are given), or oneDNN's mkldnn::_linear_pointwise on weights
//   packed once per forward/backward by rhn_recurrence.py (float32), without Python's
//   interpreter between them;
// - each micro-step's elementwise work (gates, highway update, the mask for the next
//   product; in the backward dp, 1 - g and the states s^i from the kept gates) is one
//   vectorised pass split over rows with at::parallel_for, where the Python loop issues
//   about ten single-threaded kernels that each read and write the whole [B, H].
//
// Zoneout draws come from at::rand_like on the same generator, in the same order, as
// torch.rand_like in the Python loop, so a seed gives the same masks on either path.
//
// The structures below mirror the NamedTuples of rhn_recurrence.py field by field
// (module.cpp converts them); this header also declares the pieces that the forward
// (rhn_forward.cpp) and the backward (rhn_backward.cpp) share (rhn_layer.cpp).
#pragma once

#include "common.h"

#include <utility>
#include <vector>

namespace rhn {

// One RHN layer's recurrence apart from its input (rhn_recurrence.Layer).
struct Layer {
  Tensor state;   // s_0 [B, H]
  Tensor weight;  // R [D, 2H, H]
  Tensor bias;    // b [D, 2H]
  Tensor mask;    // m_h: undefined (none), [B, H] (shared by H and T) or [B, 2, H]
  double z = 0.0;  // state zoneout probability
  bool training = false;
};

// What the forward keeps for the backward (rhn_recurrence.Kept).
struct Kept {
  Tensor pre;      // the kept micro-layers' gates [D - recomputed, T, B, 2H]; undefined:
                   // nothing is kept (no gradient wanted)
  Tensor keep;     // training zoneout's draws, bool [B, T, H], or undefined
  Tensor outputs;  // the forward's outputs [B, T, H] (the backward's s_{t-1})
  std::vector<bool> recomputed;  // per micro-layer: p not kept, recomputed by the backward
};

// The backward's weights for its products (rhn_recurrence.BackwardProducts).
struct BackwardProducts {
  Tensor operands;                     // R [D, 2H, H] (maybe a transposed copy's view)
  std::vector<Tensor> packed;          // dL/ds^i's weights packed for oneDNN, or none
  std::vector<Tensor> packed_forward;  // the recomputed micro-layers' forward weights,
                                       // packed, or none
};

// The backward's gradients in and out and its scratch space (rhn_recurrence.Workspace).
struct Workspace {
  Tensor d_outputs;      // dL/d outputs [B, T, H]
  Tensor d_projected;    // dL/d projected [B, T, 2H], written step by step
  Tensor dps;            // dp rows [D (or the recomputed layers), G, B, 2H]
  Tensor states;         // s^i rows [D, G, B, H]
  Tensor carry;          // [D, B, H]
  Tensor dp_columns;     // dp^T [D, 2H, N], or undefined (no weight gradients wanted)
  Tensor state_columns;  // (s * m_h)^T [D, H, N], or undefined
  bool dp_over_p = false;  // a kept layer's dp goes where its gates were
};

// (outputs [B, T, H], final state [B, H]); writes the gates into kept.pre and the
// zoneout draws into kept.keep where they are defined.
std::vector<Tensor> rhn_forward(const Tensor& projected, const Layer& layer, const Kept& kept,
                                const std::vector<Tensor>& packed);

// The backward over steps [start, end), from ds = dL/ds_end-1; returns dL/ds_start-1.
Tensor rhn_backward(const Layer& layer, const Kept& kept, const BackwardProducts& products,
                    const Workspace& work, int64_t start, int64_t end, Tensor ds);

// --- shared by the forward and the backward (rhn_layer.cpp) ------------------------

enum MaskKind { kNone, kShared, kSeparate };

MaskKind mask_kind(const Tensor& mask);

template <typename T>
Masks<T> masks_of(const Tensor& mask, MaskKind kind) {
  if (kind == kNone) return {};
  if (kind == kShared) return {mask.data_ptr<T>(), nullptr, mask.size(1)};
  return {mask.data_ptr<T>(), mask.data_ptr<T>() + mask.size(2), 2 * mask.size(2)};
}

// One micro-layer's weights for the products: W [2H, H] (or its halves with separate
// masks) as linear weights, with their packed forms where given.
struct Linear {
  Tensor weight[2], packed[2], bias[2];
};

// A product x W^T (+ bias) for a linear weight W [out, in]: through oneDNN with W
// prepacked by mkldnn::_reorder_linear_weight when ``packed`` is defined (a new tensor),
// else ATen's addmm/mm into ``out``. Returns where the result is.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& packed, const Tensor& bias,
              Tensor out);

// p = b + (s * m) R^T, from the masked copies of s (sm0, sm1) or s itself without mask:
// the results for the H and T halves (views of one [B, 2H] tensor but with separate masks).
std::pair<Tensor, Tensor> preactivation(const Tensor& s, const Tensor& sm0, const Tensor& sm1,
                                        const Linear& layer, MaskKind kind, const Tensor& out);

std::vector<Linear> layers_of(const Tensor& weight, const Tensor& bias,
                              const std::vector<Tensor>& packed, MaskKind kind);

// sm0 (and sm1) = s * m_h, for the next product.
void mask_into(const Tensor& s, const Tensor& mask, MaskKind kind, Tensor& sm0, Tensor& sm1);

}  // namespace rhn
