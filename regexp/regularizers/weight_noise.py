"""Gaussian weight noise: each training forward pass uses W + 𝒩(0, σ²) with a fresh draw.

The perturbation is never written into the stored weights; the gradient is taken at the
perturbed weights and applied to the stored ones (which favours flat minima, where the loss
changes little under such perturbations). Evaluation uses the stored weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.base import Regularizer, register
from regexp.regularizers.weight_transform import add_weight_transform, target_layers


@register
class WeightNoise(Regularizer):
    name = "weight_noise"

    @dataclass
    class Config:
        sigma: float = 0.01
        include_head: bool = True

    ranges = {"sigma": (lambda v: v >= 0, "a number >= 0")}

    def attach(self, model) -> None:
        sigma = self.cfg.sigma
        for layer in target_layers(model, self.cfg.include_head, self.name):
            add_weight_transform(layer, lambda w: w + sigma * torch.randn_like(w))

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"weight_noise/sigma": self.cfg.sigma}, epoch)
