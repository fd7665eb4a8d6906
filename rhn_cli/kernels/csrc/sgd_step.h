// Plain SGD with the L2 term and gradient clipping in two passes over the parameters
// (rhn_cli.engine.optim.penalised_step); see sgd_step.cpp.
#pragma once

#include "common.h"

#include <vector>

namespace rhn {

// (sum of p^2, sum of (g + wd p)^2) over all pairs, in double.
std::vector<double> l2_squares(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                               double wd);

// p -= step (g + wd p) for every pair.
void l2_sgd_update(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, double wd,
                   double step);

}  // namespace rhn
