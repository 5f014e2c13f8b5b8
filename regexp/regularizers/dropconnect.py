"""DropConnect (Wan et al. 2013): u = x(M ⊙ W)ᵀ + b with a random 0/1 mask M on the *weights*.

Each weight is dropped with probability p and the kept ones are scaled by 1/(1−p) (inverted,
like dropout), so evaluation uses the stored weights unchanged. One mask is drawn per layer
and forward pass, shared by the batch: units are not dropped, connections are. The head is
left alone unless ``include_head``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.base import Regularizer, register
from regexp.regularizers.weight_transform import add_weight_transform, target_layers


@register
class DropConnect(Regularizer):
    name = "dropconnect"

    @dataclass
    class Config:
        p: float = 0.3
        include_head: bool = False

    ranges = {"p": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")}

    def attach(self, model) -> None:
        for layer in target_layers(model, self.cfg.include_head, self.name):
            add_weight_transform(layer, self._mask_fn(layer))

    def _mask_fn(self, layer):
        keep = 1.0 - self.cfg.p

        def mask(w: torch.Tensor) -> torch.Tensor:
            m = torch.bernoulli(torch.full_like(w, keep))
            layer.last_mask = m  # read back by the tests
            return w * m / keep
        return mask

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"dropconnect/p": self.cfg.p}, epoch)
