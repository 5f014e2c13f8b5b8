"""L1 penalty on hidden activations: Ω = α · (1/B) Σₙ Σᵤ |hₙᵤ| (per example, batch mean).

Pushes most units to exactly zero for each input (sparse representations) while the weights
may stay large; the activations come from the model's hidden ``Site`` modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from regexp.regularizers.activity import ActivityPenalty, Units, batch_sum, layer_units
from regexp.regularizers.base import per_member, register


@register
class ActivityL1(ActivityPenalty):
    name = "activity_l1"

    @dataclass
    class Config:
        alpha: float = 1e-4

    ranges = {"alpha": (lambda v: v >= 0, "a number >= 0")}

    def activity_of(self, hs: List[torch.Tensor], hp, stacked: bool, units: Units = None) -> torch.Tensor:
        return per_member(hp.alpha, stacked, 1) * sum(
            batch_sum((h if u is None else h * u).abs(), stacked) for h, u in zip(hs, layer_units(units, len(hs))))
