"""Student-t activity penalty: Ω = α · (1/B) Σₙ Σᵤ log(1 + γ hₙᵤ²).

The negative log of a Student-t prior on the activations: like L1 it favours many near-zero
units, but it grows only logarithmically, so a few strongly active units are barely penalised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.activity import hidden_activations, record_hidden
from regexp.regularizers.base import Regularizer, register


@register
class ActivityStudentT(Regularizer):
    name = "activity_student_t"

    @dataclass
    class Config:
        alpha: float = 1e-4
        gamma: float = 1.0

    ranges = {"alpha": (lambda v: v >= 0, "a number >= 0"), "gamma": (lambda v: v > 0, "a number > 0")}

    def attach(self, model) -> None:
        record_hidden(model, self.name)

    def penalty(self, model) -> torch.Tensor:
        g = self.cfg.gamma
        return self.cfg.alpha * sum(torch.log1p(g * h.pow(2)).sum() / len(h)
                                    for h in hidden_activations(model))
