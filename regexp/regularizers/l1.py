"""L1 weight penalty: Ω = λ · Σ|w|, whose (sub)gradient λ·sign(w) pushes weights to exactly 0."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.base import Regularizer, member_sum, register

NONNEG = (lambda v: v >= 0, "a number >= 0")


@register
class L1(Regularizer):
    name = "l1"

    @dataclass
    class Config:
        lam: float = 1e-5
        exclude_bias_and_norm: bool = True

    ranges = {"lam": NONNEG}

    @classmethod
    def penalty_of(cls, params, hp, stacked: bool) -> torch.Tensor:
        return hp.lam * sum(member_sum(p.abs(), stacked) for p in params)
