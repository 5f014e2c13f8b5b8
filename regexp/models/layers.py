"""Small building blocks shared by the models."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def conv_norm(kind: str, channels: int, dims: int) -> nn.Module:
    """Normalization after a convolution over ``dims`` spatial dimensions."""
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels)
    if kind == "layer":  # over channels and positions, like LayerNorm on a feature map
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return (nn.InstanceNorm1d if dims == 1 else nn.InstanceNorm2d)(channels, affine=True)
    raise ValueError(kind)


def flat_dim(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
