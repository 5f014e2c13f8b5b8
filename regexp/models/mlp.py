"""Multilayer perceptron: ``depth`` hidden layers of ``width`` units, or the hidden widths
listed in ``widths`` (e.g. ``[40, 20, 20]``; when set it overrides width and depth).

``depth=0`` (or ``widths=[]``) leaves only the output layer: logits = W x + b, multinomial
logistic regression (the MNIST-1D paper's linear baseline, 410 parameters; Bishop & Bishop,
2024, ch. 5).

``residual=true`` adds a skip connection around every hidden layer whose input and output
widths are equal: h ← h + σ(W h + b), as the MNIST-1D paper's MLP (Greydanus, 2020) does
around its second layer (Prince, UDL ch. 11). A layer that changes the width (usually the
first, from the input's size to the hidden width, and each step of uneven ``widths``) has no
identity to add and stays plain: on MNIST-1D (40 inputs) ``widths=[40,20,20]`` has two
residual blocks (40 → 40 and 20 → 20) and one plain layer (40 → 20).
The hidden site (where dropout and activity penalties attach) sits on the branch σ(W h + b),
before the sum.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from regexp.models import register_model
from regexp.models.layers import activation, flat_dim
from regexp.models.sites import Site


class Residual(nn.Module):
    """x + body(x): the identity skip of a residual block."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MLP(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, width: int, depth: int,
                 act: str = "relu", norm: str = "none", bias: bool = True,
                 widths: Sequence[int] = None, residual: bool = False):
        super().__init__()
        self.input_site = Site("input")
        self.widths: List[int] = list(widths) if widths is not None else [width] * depth
        layers = []
        d = in_dim
        for w in self.widths:
            layer = [nn.Linear(d, w, bias=bias)]
            if norm == "batch":
                layer.append(nn.BatchNorm1d(w))
            elif norm == "layer":
                layer.append(nn.LayerNorm(w))
            layer += [activation(act), Site("hidden")]
            if residual:  # one module per layer, a skip where the widths allow one
                layers.append(Residual(nn.Sequential(*layer)) if w == d else nn.Sequential(*layer))
            else:  # flat, so a plain MLP's parameter names stay hidden.0.weight, hidden.2.weight ...
                layers += layer
            d = w
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.input_site(x.flatten(1))))


@register_model("mlp")
def build_mlp(cfg, input_shape, num_classes) -> nn.Module:
    widths = cfg.get("widths")
    return MLP(flat_dim(input_shape), num_classes, cfg.width, cfg.depth, cfg.activation, cfg.norm,
               cfg.get("bias", True), list(widths) if widths is not None else None,
               cfg.get("residual", False))
