"""Elastic net: Ω = λ₁ · Σ|w| + λ₂/2 · Σw², the L1 and L2 penalties together
(sparse like L1, but correlated weights are shrunk together as under L2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.base import Regularizer, member_sum, register
from regexp.regularizers.l1 import NONNEG


@register
class ElasticNet(Regularizer):
    name = "elastic_net"

    @dataclass
    class Config:
        lam1: float = 1e-5  # L1 strength
        lam2: float = 1e-4  # L2 strength
        exclude_bias_and_norm: bool = True

    ranges = {"lam1": NONNEG, "lam2": NONNEG}

    @classmethod
    def penalty_of(cls, params, hp, stacked: bool) -> torch.Tensor:
        return sum(hp.lam1 * member_sum(p.abs(), stacked) + 0.5 * hp.lam2 * member_sum(p.pow(2), stacked)
                   for p in params)
