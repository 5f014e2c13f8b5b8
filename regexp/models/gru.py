"""Recurrent classifier: a (bidirectional) GRU over the time steps, then a linear head.

A 1-D signal ``(C, L)`` is a sequence of ``L`` steps of ``C`` values (MNIST-1D: 40 steps of
one value); an image ``(C, H, W)`` is read row by row, ``H`` steps of ``C * W`` values (as
sequential MNIST reads its rows). ``head=flatten`` concatenates every step's output into one
Linear, as the MNIST-1D paper's GRU does (Greydanus, 2020: hidden 6, bidirectional, 5,134
parameters); ``head=last`` reads only the final state of each direction.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from regexp.models import register_model
from regexp.models.sites import Site


class GRUClassifier(nn.Module):
    def __init__(self, input_shape, num_classes: int, hidden_size: int, layers: int = 1,
                 bidirectional: bool = True, head: str = "flatten"):
        super().__init__()
        steps = input_shape[1]
        features = input_shape[0] * (input_shape[2] if len(input_shape) == 3 else 1)
        directions = 2 if bidirectional else 1
        self.input_site = Site("input")
        self.rnn = nn.GRU(features, hidden_size, layers, batch_first=True, bidirectional=bidirectional)
        self.hidden_site = Site("hidden")
        self.flatten = head == "flatten"
        out = directions * hidden_size * (steps if self.flatten else 1)
        self.head = nn.Linear(out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_site(x)
        # (N, C, L) -> (N, L, C); (N, C, H, W) -> (N, H, C*W): one step per position / row
        seq = x.transpose(1, 2) if x.dim() == 3 else x.permute(0, 2, 1, 3).flatten(2)
        out, h_n = self.rnn(seq)
        if self.flatten:
            return self.head(self.hidden_site(out.flatten(1)))
        # h_n: (layers * directions, N, hidden); the last layer's final state of each direction
        last = h_n[-(2 if self.rnn.bidirectional else 1):].transpose(0, 1).flatten(1)
        return self.head(self.hidden_site(last))


@register_model("gru")
def build_gru(cfg, input_shape, num_classes) -> nn.Module:
    if len(input_shape) not in (2, 3):
        raise ValueError(f"gru needs (C, L) or (C, H, W) inputs, got {input_shape}")
    return GRUClassifier(input_shape, num_classes, cfg.hidden_size, cfg.layers, cfg.bidirectional,
                         cfg.head)
