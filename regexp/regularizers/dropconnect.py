"""DropConnect (Wan et al. 2013): u = x(M ⊙ W)ᵀ + b with a random 0/1 mask M on the *weights*.

Each weight is dropped with probability p and the kept ones are scaled by 1/(1−p) (inverted,
like dropout), so evaluation uses the stored weights unchanged. One mask is drawn per layer
and forward pass, shared by the batch: units are not dropped, connections are. The head is
left alone unless ``include_head``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from regexp.regularizers.base import Regularizer, register
from regexp.regularizers.weight_transform import add_weight_transform, target_layers


def connect_mask(like: torch.Tensor, keep: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A 0/1 mask of ``like``'s shape, each entry kept with probability ``keep``, drawn as a lone
    run draws it (``generator`` None: the global one; a population member's: its own)."""
    return torch.bernoulli(torch.full_like(like, keep), generator=generator)


def connected(w: torch.Tensor, mask: torch.Tensor, keep: Union[float, torch.Tensor]) -> torch.Tensor:
    """The weights a training pass computes with: kept ones scaled by 1/keep (inverted, like
    dropout). A population's stacked (M, out, in) weights take a per-member keep (M, 1, 1)."""
    return w * mask / keep


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
            m = connect_mask(w, keep)
            layer.last_mask = m  # read back by the tests
            return connected(w, m, keep)
        return mask

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"dropconnect/p": self.cfg.p}, epoch)
