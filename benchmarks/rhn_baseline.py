"""The straightforward RHN language model, kept as the baseline of the RHN benchmarks.

This is the reference TF model written the obvious way in PyTorch: a Python loop over
time steps and micro-layers, one ``nn.Linear`` per transform (H and T separately, 2 per
micro-layer), and the input entering micro-layer 0 inside the loop, as TF's
``Linear([x_t * m_i, s * m_h])`` on the concatenation, [(in + H) -> H] per transform:

    h^0 = tanh   (Linear_H^0([x_t * m_i, s * m_h]))      h^i = tanh   (Linear_H^i(s * m_h))
    t^0 = sigmoid(Linear_T^0([x_t * m_i, s * m_h]))      t^i = sigmoid(Linear_T^i(s * m_h))
    s <- (h - s) * t + s

When H and T share their masks (``tied_noise``) they share the masked input too; TF
computes it twice, which only costs this baseline more time and memory.

Everything else (embedding, word-type and variational dropout masks, tied output,
initialisation) is rhn's :class:`~rhn_cli.models.rhn.RHNLanguageModel`, whose masks it
takes. :func:`from_rhn` copies an RHN model's weights into a baseline, and
:func:`rhn_layout` maps the baseline's parameters (or their gradients) back to the RHN
model's names and shapes, so outputs and gradients can be compared.
"""

from __future__ import annotations

import torch
from torch import nn

from rhn_cli.models.rhn import RHNConfig, RHNLanguageModel
from rhn_cli.models.zoneout import zoneout


class BaselineRHNLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, depth: int, z_states: float = 0.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.z_states = z_states
        widths = [input_size + hidden_size] + [hidden_size] * (depth - 1)
        self.h_transforms = nn.ModuleList(nn.Linear(w, hidden_size) for w in widths)
        self.t_transforms = nn.ModuleList(nn.Linear(w, hidden_size) for w in widths)

    def forward(self, inputs, state, input_mask=None, state_mask=None):
        """inputs [B, T, in], state [B, H]; masks [B, width] or [B, 2, width] (H, T)."""
        i_h, i_t = _per_transform(input_mask)
        m_h, m_t = _per_transform(state_mask)
        separate = m_h is not m_t or i_h is not i_t  # else H and T share their input
        s = state
        outputs = []
        for step in range(inputs.shape[1]):
            previous = s
            for i, (h_linear, t_linear) in enumerate(
                zip(self.h_transforms, self.t_transforms, strict=True)
            ):
                s_h = _drop(s, m_h)
                if i == 0:
                    s_h = torch.cat([_drop(inputs[:, step], i_h), s_h], dim=1)
                s_t = s_h
                if separate:
                    s_t = _drop(s, m_t)
                    if i == 0:
                        s_t = torch.cat([_drop(inputs[:, step], i_t), s_t], dim=1)
                h = torch.tanh(h_linear(s_h))
                t = torch.sigmoid(t_linear(s_t))
                s = (h - s) * t + s
            if self.z_states:
                s = zoneout(s, previous, self.z_states, self.training)
            outputs.append(s)
        return torch.stack(outputs, dim=1), s


def _per_transform(mask):
    if mask is None or mask.dim() == 2:
        return mask, mask
    return mask[:, 0], mask[:, 1]


def _drop(x, mask):
    return x if mask is None else x * mask


class BaselineRHNLanguageModel(nn.Module):
    """Embedding -> baseline RHN layer(s) -> (tied) softmax output; RHNLanguageModel's API."""

    def __init__(self, config: RHNConfig) -> None:
        super().__init__()
        self.config = config
        V, H, in_size = config.vocab_size, config.hidden_size, config.in_size
        self.embedding = nn.Embedding(V, in_size)
        self.layers = nn.ModuleList(
            BaselineRHNLayer(in_size if k == 0 else H, H, config.depth, config.z_states)
            for k in range(config.num_layers)
        )
        self.output_weight = None if config.tied else nn.Parameter(torch.empty(V, H))
        self.output_bias = nn.Parameter(torch.empty(V))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-init_scale, init_scale) everywhere, T biases ``init_bias`` (the reference's)."""
        c = self.config
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-c.init_scale, c.init_scale)
            for layer in self.layers:
                for h_linear, t_linear in zip(layer.h_transforms, layer.t_transforms, strict=True):
                    if c.init_other_bias is not None:
                        h_linear.bias.fill_(c.init_other_bias)
                    t_linear.bias.fill_(c.init_bias)
            if c.init_other_bias is not None:
                self.output_bias.fill_(c.init_other_bias)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        like = self.output_bias
        return like.new_zeros(self.config.num_layers, batch_size, self.config.hidden_size)

    # The same masks as the RHN model: it only reads self.config and self.output_bias.
    draw_masks = RHNLanguageModel.draw_masks

    def forward(self, tokens, state, masks=None):
        """tokens [B, T], state [L, B, H] -> (logits [B, T, V], new state [L, B, H])."""
        if not self.training:
            masks = None
        elif masks is None:
            masks = self.draw_masks(tokens)
        x = self.embedding(tokens)
        if masks is not None and masks["x"] is not None:
            x = x * masks["x"]
        finals = []
        for k, layer in enumerate(self.layers):
            input_mask = masks["i"][k] if masks is not None else None
            state_mask = masks["h"][k] if masks is not None else None
            x, s = layer(x, state[k], input_mask, state_mask)
            finals.append(s)
        if masks is not None and masks["o"] is not None:
            x = x * masks["o"].unsqueeze(1)
        weight = self.embedding.weight if self.output_weight is None else self.output_weight
        return x @ weight.t() + self.output_bias, torch.stack(finals)


def from_rhn(model: RHNLanguageModel) -> BaselineRHNLanguageModel:
    """A baseline with ``model``'s config, weights, dtype and device."""
    weight = model.output_bias
    with torch.device(weight.device):
        baseline = BaselineRHNLanguageModel(model.config).to(weight.dtype)
    H = model.config.hidden_size
    with torch.no_grad():
        for name, p in _rhn_to_baseline(model.state_dict(), H).items():
            baseline.get_parameter(name).copy_(p)
    return baseline


def rhn_layout(baseline: BaselineRHNLanguageModel, grads: bool = False) -> dict:
    """The baseline's parameters (or, with ``grads``, their gradients) under the RHN
    model's parameter names and shapes."""
    H = baseline.config.hidden_size
    tensors = {name: (p.grad if grads else p.detach()) for name, p in baseline.named_parameters()}
    out = {name: t for name, t in tensors.items() if not name.startswith("layers.")}
    for k, layer in enumerate(baseline.layers):
        pre = f"layers.{k}"
        h0 = tensors[f"{pre}.h_transforms.0.weight"]
        t0 = tensors[f"{pre}.t_transforms.0.weight"]
        in_size = h0.shape[1] - H
        out[f"{pre}.input_weight"] = torch.cat([h0[:, :in_size], t0[:, :in_size]])
        recurrent = [torch.cat([h0[:, in_size:], t0[:, in_size:]])]
        biases = []
        for i in range(len(layer.h_transforms)):
            if i > 0:
                recurrent.append(
                    torch.cat(
                        [
                            tensors[f"{pre}.h_transforms.{i}.weight"],
                            tensors[f"{pre}.t_transforms.{i}.weight"],
                        ]
                    )
                )
            biases.append(
                torch.cat(
                    [
                        tensors[f"{pre}.h_transforms.{i}.bias"],
                        tensors[f"{pre}.t_transforms.{i}.bias"],
                    ]
                )
            )
        out[f"{pre}.recurrent_weight"] = torch.stack(recurrent)
        out[f"{pre}.bias"] = torch.stack(biases)
    return out


def _rhn_to_baseline(state: dict, H: int) -> dict:
    """RHN model parameters -> the baseline's names and shapes."""
    out = {name: t for name, t in state.items() if not name.startswith("layers.")}
    layers = sorted({int(name.split(".")[1]) for name in state if name.startswith("layers.")})
    for k in layers:
        pre = f"layers.{k}"
        W_x, R, b = (
            state[f"{pre}.input_weight"],
            state[f"{pre}.recurrent_weight"],
            state[f"{pre}.bias"],
        )
        for i in range(R.shape[0]):
            for name, rows in (("h_transforms", slice(0, H)), ("t_transforms", slice(H, 2 * H))):
                weight = R[i, rows]
                if i == 0:  # TF's Linear on [x * m_i, s * m_h]
                    weight = torch.cat([W_x[rows], weight], dim=1)
                out[f"{pre}.{name}.{i}.weight"] = weight
                out[f"{pre}.{name}.{i}.bias"] = b[i, rows]
    return out
