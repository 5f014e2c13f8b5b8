"""Multilayer perceptron: ``depth`` hidden layers of ``width`` units.

``depth=0`` leaves only the output layer: logits = W x + b, multinomial logistic regression
(the MNIST-1D paper's linear baseline, 410 parameters; Bishop & Bishop, 2024, ch. 5).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from regexp.models import register_model
from regexp.models.layers import activation, flat_dim
from regexp.models.sites import Site


class MLP(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, width: int, depth: int,
                 act: str = "relu", norm: str = "none", bias: bool = True):
        super().__init__()
        self.input_site = Site("input")
        layers = []
        d = in_dim
        for _ in range(depth):
            layers.append(nn.Linear(d, width, bias=bias))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers += [activation(act), Site("hidden")]
            d = width
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.input_site(x.flatten(1))))


@register_model("mlp")
def build_mlp(cfg, input_shape, num_classes) -> nn.Module:
    return MLP(flat_dim(input_shape), num_classes, cfg.width, cfg.depth, cfg.activation, cfg.norm,
               cfg.get("bias", True))
