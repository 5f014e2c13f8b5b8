"""Weight initialization schemes (``model.init``).

``default`` keeps PyTorch's own (Kaiming-uniform with a=sqrt(5)); the others set every
Linear/Conv weight and zero the biases:

- ``xavier``: U(±sqrt(6 / (n_in + n_out))), variance 2 / (n_in + n_out) (Glorot & Bengio)
- ``he``: N(0, 2 / n_in) (He et al.), for ReLU networks
- ``normal``: N(0, init_std²)
- ``zeros``: every weight 0, the textbook case where symmetry is never broken
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

INITS = ("default", "xavier", "he", "normal", "zeros")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str, std: float = 0.01) -> None:
    if scheme == "default":
        return
    for m in model.modules():
        if not isinstance(m, _LAYERS):
            continue
        w = m.weight
        fan_in = w[0].numel()
        fan_out = w.shape[0] * (w[0].numel() // w.shape[1])
        if scheme == "xavier":
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w.uniform_(-bound, bound)
        elif scheme == "he":
            w.normal_(0.0, math.sqrt(2.0 / fan_in))
        elif scheme == "normal":
            w.normal_(0.0, std)
        elif scheme == "zeros":
            w.zero_()
        else:
            raise ValueError(f"unknown init {scheme!r}")
        if m.bias is not None:
            m.bias.zero_()
