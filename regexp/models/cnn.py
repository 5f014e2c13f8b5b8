"""Convolutional network: one conv stage per entry of ``channels``, then a linear head.

Uses 1-D convolutions for signals ``(C, L)`` and 2-D for images ``(C, H, W)``. Each stage has
its own kernel size, stride and padding (a stage maps a length n to ⌊(n + 2p − k)/s⌋ + 1).
The head is global average pooling then Linear (``head=gap``, the default), or flatten then
Linear (``head=flatten``), as in the MNIST-1D paper's ConvBase (Greydanus, 2020):
``channels=[25,25,25] kernel_size=[5,3,3] stride=2 padding=1 pool=none head=flatten``
(``configs/model/cnn_mnist1d.yaml``).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from regexp.errors import ConfigError
from regexp.models import register_model
from regexp.models.layers import activation, conv_norm
from regexp.models.sites import Site


def conv_length(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


class CNN(nn.Module):
    def __init__(self, input_shape, num_classes: int, channels: Sequence[int], kernel_size=5,
                 pool: str = "max", norm: str = "none", act: str = "relu", stride=1, padding=None,
                 head: str = "gap"):
        super().__init__()
        n = len(channels)
        per_stage = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
        kernels, strides = per_stage(kernel_size), per_stage(stride)
        pads = [k // 2 for k in kernels] if padding is None else per_stage(padding)
        dims = len(input_shape) - 1
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        pools = {"max": nn.MaxPool1d if dims == 1 else nn.MaxPool2d,
                 "avg": nn.AvgPool1d if dims == 1 else nn.AvgPool2d}
        self.input_site = Site("input")
        layers = []
        c_in, sizes = input_shape[0], tuple(input_shape[1:])
        for i, (c, k, s, p) in enumerate(zip(channels, kernels, strides, pads)):
            sizes = self._after_conv(i, sizes, k, s, p)
            layers += [conv(c_in, c, k, stride=s, padding=p),
                       conv_norm(norm, c, dims), activation(act), Site("hidden")]
            if pool != "none" and min(sizes) >= 2:  # never pool a map down to nothing
                layers.append(pools[pool](2))
                sizes = tuple(d // 2 for d in sizes)
            c_in = c
        self.features = nn.Sequential(*layers)
        self.dims = dims
        self.flatten = head == "flatten"
        self.out_sizes = sizes  # the last stage's output length (or height, width)
        features = c_in * (int(torch.tensor(sizes).prod()) if self.flatten else 1)
        self.head = nn.Linear(features, num_classes)

    @staticmethod
    def _after_conv(stage: int, sizes: Tuple[int, ...], k: int, s: int, p: int) -> Tuple[int, ...]:
        out = tuple(conv_length(d, k, s, p) for d in sizes)
        if min(out) < 1:
            raise ConfigError(
                f"model.kernel_size/stride/padding: stage {stage} (kernel {k}, stride {s}, padding {p}) "
                f"would shrink its input of size {'x'.join(map(str, sizes))} to "
                f"{'x'.join(map(str, out))}: expected (n + 2*padding - kernel) // stride + 1 >= 1; "
                "use a smaller kernel or stride, more padding, or fewer stages (or pool=none)")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.input_site(x))
        if self.flatten:
            return self.head(h.flatten(1))
        return self.head(h.flatten(2).mean(-1))  # global average pooling


@register_model("cnn")
def build_cnn(cfg, input_shape, num_classes) -> nn.Module:
    from regexp.config import stage_values

    if len(input_shape) not in (2, 3):
        raise ValueError(f"cnn needs (C, L) or (C, H, W) inputs, got {input_shape}")
    per_stage: List[List[int]] = [stage_values(cfg, key, low)
                                  for key, low in (("kernel_size", 1), ("stride", 1), ("padding", 0))]
    kernels, strides, pads = per_stage
    return CNN(input_shape, num_classes, list(cfg.channels), kernels, cfg.pool, cfg.norm,
               cfg.activation, strides, pads, cfg.get("head", "gap"))
