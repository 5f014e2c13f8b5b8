"""Training-time transforms of layer weights (DropConnect masks, weight noise).

Each Linear / Conv layer gets a list of functions ``W -> W'`` applied in its forward pass in
training mode only; the stored parameter is never changed, so a perturbation is drawn fresh for
every forward pass and the gradient flows back to the stored weights through W'. The model's
state_dict keys stay the same (no parametrization wrapper), so saved runs load anywhere.
"""
from __future__ import annotations

import types
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

Transform = Callable[[torch.Tensor], torch.Tensor]
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if self.training:
        for fn in self.weight_transforms:
            w = fn(w)
    if isinstance(self, nn.Linear):
        return F.linear(x, w, self.bias)
    return self._conv_forward(x, w, self.bias)


def target_layers(model: nn.Module, include_head: bool, regularizer: str) -> List[nn.Module]:
    """Every Linear/Conv layer, except output layers (modules named ``head``, one per ensemble
    member) unless asked. A model whose weights these miss (a GRU's recurrent weights) or that
    leaves none (logistic regression without its head) is refused: the regularizer would
    silently not act where the user expects it to."""
    from regexp.errors import ConfigError

    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        raise ConfigError(f"regularizer.{regularizer} perturbs Linear/Conv weights, not a GRU's recurrent "
                          "ones: expected a model without recurrent layers (mlp, cnn, transformer)")
    layers = [m for name, m in model.named_modules() if isinstance(m, LAYERS)
              and (include_head or name.split(".")[-1] != "head")]
    if not layers:
        raise ConfigError(f"regularizer.{regularizer}.include_head=false leaves this model no layer "
                          "(model.depth=0 has only its output layer): expected include_head=true or "
                          "model.depth >= 1")
    return layers


def add_weight_transform(layer: nn.Module, fn: Transform) -> None:
    if not hasattr(layer, "weight_transforms"):
        layer.weight_transforms = []
        layer.forward = types.MethodType(_forward, layer)
    layer.weight_transforms.append(fn)
