"""Shared by the activity penalties: the check that a model has hidden units, and the helpers
of their formulas.

An activity penalty's formula is written once, as ``activity_of(hs, hp, stacked, units)``:
``hs`` are the hidden activations, one tensor per hidden layer, ``hp`` its hyperparameters.
The population engine passes the (M, B, width) activations its stacked forward recorded with
an (M,) tensor per numeric key and ``units``, the (M, 1, width) mask of each member's real
units (a narrower member's padded units are zero there; a list, one per hidden layer, where
layers differ in width: a CNN's stages, an MLP's ``model.widths``), and gets one value per
member; ``stacked=False`` is the same formula on one model's (B, ...) activations (a scalar).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from regexp.models.sites import hidden_sites
from regexp.regularizers.base import Regularizer


Units = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]


def layer_units(units: Units, layers: int) -> List[Optional[torch.Tensor]]:
    """Each hidden layer's mask of real units: one mask for all of them, or one per layer."""
    return list(units) if isinstance(units, (list, tuple)) else [units] * layers


def batch_sum(t: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Σ over all of an activation-shaped tensor but the member, divided by the batch size
    (dim 1 stacked, dim 0 lone): the per-example mean of a sum over units."""
    return (t.sum(dim=tuple(range(1, t.dim()))) if stacked else t.sum()) / t.shape[int(stacked)]


class ActivityPenalty(Regularizer):
    """A penalty on the hidden activations, ``activity_of``, for a model that has some."""

    def attach(self, model) -> None:
        hidden_sites(model, self.name)  # refuses a model without hidden units

    def activity_of(self, hs: List[torch.Tensor], hp, stacked: bool, units: Units = None) -> torch.Tensor:
        raise NotImplementedError
