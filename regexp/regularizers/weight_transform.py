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


def target_layers(model: nn.Module, include_head: bool) -> List[nn.Module]:
    """Every Linear/Conv layer, except output layers (modules named ``head``, one per ensemble
    member) unless asked."""
    return [m for name, m in model.named_modules() if isinstance(m, LAYERS)
            and (include_head or name.split(".")[-1] != "head")]


def add_weight_transform(layer: nn.Module, fn: Transform) -> None:
    if not hasattr(layer, "weight_transforms"):
        layer.weight_transforms = []
        layer.forward = types.MethodType(_forward, layer)
    layer.weight_transforms.append(fn)
