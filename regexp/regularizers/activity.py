"""Shared by the activity penalties: the hidden activations of the last forward pass, and the
hook both engines call.

An activity penalty's formula is written once, as ``activity_of(hs, hp, stacked, units)``:
``hs`` are the hidden activations, one tensor per hidden layer, ``hp`` its hyperparameters.
A lone run passes its model's (B, ...) activations with the config's values and gets a
scalar; the population engine passes its stacked (M, B, width) activations with an (M,)
tensor per numeric key and ``units``, the (M, 1, width) mask of each member's real units
(a narrower member's padded units are zero there; a list, one per hidden layer, where layers
differ in width: a CNN's stages, an MLP's ``model.widths``), and gets one value per member.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from regexp.models.sites import hidden_sites, sites
from regexp.regularizers.base import Regularizer


def record_hidden(model: nn.Module, regularizer: str) -> None:
    for s in hidden_sites(model, regularizer):
        s.record = True


def hidden_activations(model: nn.Module) -> List[torch.Tensor]:
    return [s.last for s in sites(model, "hidden") if s.last is not None]


Units = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]


def layer_units(units: Units, layers: int) -> List[Optional[torch.Tensor]]:
    """Each hidden layer's mask of real units: one mask for all of them, or one per layer."""
    return list(units) if isinstance(units, (list, tuple)) else [units] * layers


def batch_sum(t: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Σ over all of an activation-shaped tensor but the member, divided by the batch size
    (dim 1 stacked, dim 0 lone): the per-example mean of a sum over units."""
    return (t.sum(dim=tuple(range(1, t.dim()))) if stacked else t.sum()) / t.shape[int(stacked)]


class ActivityPenalty(Regularizer):
    """A penalty on the hidden activations: records them, and applies ``activity_of`` to them."""

    def attach(self, model) -> None:
        record_hidden(model, self.name)

    def penalty(self, model) -> torch.Tensor:
        return self.activity_of(hidden_activations(model), self.cfg, False)

    def activity_of(self, hs: List[torch.Tensor], hp, stacked: bool, units: Units = None) -> torch.Tensor:
        raise NotImplementedError
