// The Python module of rhn's native kernels: its entry points, and the conversion of
// rhn_recurrence.py's NamedTuples (Layer, Kept, BackwardProducts, Workspace) into the C++
// structures of rhn_recurrence.h, field by field, by name (None: an undefined tensor).
#include <torch/extension.h>

#include "cross_entropy.h"
#include "rhn_recurrence.h"
#include "sgd_step.h"
#include "transpose.h"

namespace py = pybind11;

namespace rhn {
namespace {

Tensor tensor_field(const py::handle& fields, const char* name) {
  py::object value = fields.attr(name);
  return value.is_none() ? Tensor() : value.cast<Tensor>();
}

std::vector<Tensor> tensors_field(const py::handle& fields, const char* name) {
  return fields.attr(name).cast<std::vector<Tensor>>();
}

Layer layer_from(const py::handle& fields) {
  Layer layer;
  layer.state = tensor_field(fields, "state");
  layer.weight = tensor_field(fields, "weight");
  layer.bias = tensor_field(fields, "bias");
  layer.mask = tensor_field(fields, "mask");
  layer.z = fields.attr("z_states").cast<double>();
  layer.training = fields.attr("training").cast<bool>();
  return layer;
}

// None: nothing kept (no gradient wanted).
Kept kept_from(const py::handle& fields, int64_t depth) {
  Kept kept;
  kept.recomputed.assign(depth, false);
  if (fields.is_none()) return kept;
  kept.pre = tensor_field(fields, "pre");
  kept.keep = tensor_field(fields, "keep");
  kept.outputs = tensor_field(fields, "outputs");
  for (auto i : fields.attr("recomputed").cast<std::vector<int64_t>>()) kept.recomputed.at(i) = true;
  return kept;
}

BackwardProducts products_from(const py::handle& fields) {
  BackwardProducts products;
  products.operands = tensor_field(fields, "operands");
  products.packed = tensors_field(fields, "packed");
  products.packed_forward = tensors_field(fields, "packed_forward");
  return products;
}

Workspace workspace_from(const py::handle& fields) {
  Workspace work;
  work.d_outputs = tensor_field(fields, "d_outputs");
  work.d_projected = tensor_field(fields, "d_projected");
  work.dps = tensor_field(fields, "dps");
  work.states = tensor_field(fields, "states");
  work.carry = tensor_field(fields, "carry");
  work.dp_columns = tensor_field(fields, "dp_columns");
  work.state_columns = tensor_field(fields, "state_columns");
  work.dp_over_p = fields.attr("dp_over_p").cast<bool>();
  return work;
}

std::vector<Tensor> forward(const Tensor& projected, const py::handle& layer_fields,
                            const py::handle& kept_fields, const std::vector<Tensor>& packed) {
  const Layer layer = layer_from(layer_fields);
  return rhn_forward(projected, layer, kept_from(kept_fields, layer.weight.size(0)), packed);
}

Tensor backward(const py::handle& layer_fields, const py::handle& kept_fields,
                const py::handle& products, const py::handle& work, int64_t start, int64_t end,
                const Tensor& ds) {
  const Layer layer = layer_from(layer_fields);
  return rhn_backward(layer, kept_from(kept_fields, layer.weight.size(0)),
                      products_from(products), workspace_from(work), start, end, ds);
}

}  // namespace
}  // namespace rhn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("rhn_forward", &rhn::forward,
             "RHN recurrence forward (projected, Layer, Kept or None, packed weights)");
  module.def("rhn_backward", &rhn::backward,
             "RHN recurrence backward over steps [start, end) (Layer, Kept, BackwardProducts, "
             "Workspace, start, end, dL/ds_end-1)");
  module.def("transpose_into", &rhn::transpose_into, "dst[..., j, i] = src[..., i, j]");
  module.def("release", &rhn::release, "give a dead tensor's whole pages back to the system");
  module.def("cross_entropy_forward", &rhn::cross_entropy_forward,
             "summed softmax cross-entropy and the rows' log-sum-exp");
  module.def("cross_entropy_backward", &rhn::cross_entropy_backward,
             "its gradient, scale * (softmax - onehot), as a [V, N] (column-major) tensor");
  module.def("l2_squares", &rhn::l2_squares, "(sum p^2, sum (g + wd p)^2) over parameters");
  module.def("l2_sgd_update", &rhn::l2_sgd_update, "p -= step (g + wd p) for every parameter");
}
