"""Student-t activity penalty: Ω = α · (1/B) Σₙ Σᵤ log(1 + γ hₙᵤ²).

The negative log of a Student-t prior on the activations: like L1 it favours many near-zero
units, but it grows only logarithmically, so a few strongly active units are barely penalised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from regexp.regularizers.activity import ActivityPenalty, Units, batch_sum, layer_units
from regexp.regularizers.base import per_member, register


@register
class ActivityStudentT(ActivityPenalty):
    name = "activity_student_t"

    @dataclass
    class Config:
        alpha: float = 1e-4
        gamma: float = 1.0

    ranges = {"alpha": (lambda v: v >= 0, "a number >= 0"), "gamma": (lambda v: v > 0, "a number > 0")}

    def activity_of(self, hs: List[torch.Tensor], hp, stacked: bool, units: Units = None) -> torch.Tensor:
        g = per_member(hp.gamma, stacked, 3)
        return per_member(hp.alpha, stacked, 1) * sum(
            batch_sum(torch.log1p(g * (h if u is None else h * u).pow(2)), stacked)
            for h, u in zip(hs, layer_units(units, len(hs))))
