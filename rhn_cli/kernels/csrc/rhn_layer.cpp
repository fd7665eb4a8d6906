// The pieces of an RHN layer's products that its forward and backward share; see
// rhn_recurrence.h.
#include "rhn_recurrence.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>

#include <optional>

namespace rhn {

MaskKind mask_kind(const Tensor& mask) {
  if (!mask.defined()) return kNone;
  return mask.dim() == 2 ? kShared : kSeparate;
}

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

}  // namespace rhn
