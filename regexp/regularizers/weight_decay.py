"""L2 weight decay added to the loss: Ω = λ/2 · Σ w², so its gradient is λw.

Under plain SGD this equals shrinking every weight by ηλ each step; under Adam it does
not (the penalty's gradient is rescaled per coordinate), which is what
``decoupled_weight_decay`` is for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.base import Regularizer, member_sum, register


@register
class WeightDecay(Regularizer):
    name = "weight_decay"

    @dataclass
    class Config:
        lam: float = 1e-4
        exclude_bias_and_norm: bool = True

    ranges = {"lam": (lambda v: v >= 0, "a number >= 0")}

    @classmethod
    def penalty_of(cls, params, hp, stacked: bool) -> torch.Tensor:
        return 0.5 * hp.lam * sum(member_sum(p.pow(2), stacked) for p in params)
