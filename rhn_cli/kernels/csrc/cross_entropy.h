// The training loss's softmax cross-entropy and its gradient (rhn_cli/engine/
// cross_entropy.py), one pass each; see cross_entropy.cpp.
#pragma once

#include "common.h"

#include <vector>

namespace rhn {

// (the loss summed over rows whose target is not ``ignore``, the rows' log-sum-exp [N]).
std::vector<Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& targets,
                                          int64_t ignore);

// scale * (softmax(x_n) - onehot(t_n)) (zero for ignored rows), as a [V, N] tensor.
Tensor cross_entropy_backward(const Tensor& logits, const Tensor& lse, const Tensor& targets,
                              int64_t ignore, double scale);

}  // namespace rhn
