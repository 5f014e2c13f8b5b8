"""Convolutional network: one conv stage per entry of ``channels``, then global pooling.

Uses 1-D convolutions for signals ``(C, L)`` and 2-D for images ``(C, H, W)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from regexp.models import register_model
from regexp.models.layers import activation, conv_norm
from regexp.models.sites import Site


class CNN(nn.Module):
    def __init__(self, input_shape, num_classes: int, channels, kernel_size: int = 5,
                 pool: str = "max", norm: str = "none", act: str = "relu"):
        super().__init__()
        dims = len(input_shape) - 1
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        pools = {"max": nn.MaxPool1d if dims == 1 else nn.MaxPool2d,
                 "avg": nn.AvgPool1d if dims == 1 else nn.AvgPool2d}
        self.input_site = Site("input")
        layers = []
        c_in, size = input_shape[0], min(input_shape[1:])
        for c in channels:
            layers += [conv(c_in, c, kernel_size, padding=kernel_size // 2),
                       conv_norm(norm, c, dims), activation(act), Site("hidden")]
            if pool != "none" and size >= 2:  # never pool a map down to nothing
                layers.append(pools[pool](2))
                size //= 2
            c_in = c
        self.features = nn.Sequential(*layers)
        self.dims = dims
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.input_site(x))
        return self.head(h.flatten(2).mean(-1))  # global average pooling


@register_model("cnn")
def build_cnn(cfg, input_shape, num_classes) -> nn.Module:
    if len(input_shape) not in (2, 3):
        raise ValueError(f"cnn needs (C, L) or (C, H, W) inputs, got {input_shape}")
    return CNN(input_shape, num_classes, list(cfg.channels), cfg.kernel_size, cfg.pool, cfg.norm,
               cfg.activation)
