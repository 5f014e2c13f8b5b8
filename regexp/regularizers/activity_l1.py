"""L1 penalty on hidden activations: Ω = α · (1/B) Σₙ Σᵤ |hₙᵤ| (per example, batch mean).

Pushes most units to exactly zero for each input (sparse representations) while the weights
may stay large; the activations come from the model's hidden ``Site`` modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.activity import hidden_activations, record_hidden
from regexp.regularizers.base import Regularizer, register


@register
class ActivityL1(Regularizer):
    name = "activity_l1"

    @dataclass
    class Config:
        alpha: float = 1e-4

    ranges = {"alpha": (lambda v: v >= 0, "a number >= 0")}

    def attach(self, model) -> None:
        record_hidden(model, self.name)

    def penalty(self, model) -> torch.Tensor:
        return self.cfg.alpha * sum(h.abs().sum() / len(h) for h in hidden_activations(model))
