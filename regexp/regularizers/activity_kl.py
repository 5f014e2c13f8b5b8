"""KL sparsity penalty on hidden units: Ω = α · Σⱼ KL(ρ ‖ ρ̂ⱼ), summed over every hidden unit j.

Goodfellow et al., Deep Learning §7.10 (the sparse autoencoder's penalty, Ng 2011):
KL(ρ ‖ ρ̂) = ρ log(ρ/ρ̂) + (1 − ρ) log((1 − ρ)/(1 − ρ̂)), with ρ̂ⱼ = (1/B) Σₙ qₙⱼ the mean of unit
j's activation over the batch, read as the probability that the unit fires. Unlike the L1 and
Student-t penalties, which act on every example, it constrains each unit's *average* firing
rate to the target ρ and lets it be large on the examples where it fires.

The activation must lie in [0, 1] to be such a rate:

- ``sigmoid``: q = h as it is.
- ``relu`` (in [0, ∞)): q = 1 − exp(−h), a smooth squashing into [0, 1) that equals h to first
  order near 0 (where a sparse unit lives) and keeps a gradient for large h, where clamping
  at 1 would lose it; exact zeros stay exact zeros.
- any other activation (tanh, gelu: negative values) is refused, since no firing rate is
  defined for it.

Every element of a hidden activation counts as a unit (a convolution's unit is a channel at a
position). ρ̂ is kept inside [1e-6, 1 − 1e-6] so a unit that is off on the whole batch
(ρ̂ = 0, a dead ReLU) gives a finite penalty; its gradient is zero there anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

import torch

from regexp.errors import ConfigError
from regexp.models.layers import ACTIVATIONS
from regexp.regularizers.activity import ActivityPenalty, Units, layer_units
from regexp.regularizers.base import member_sum, per_member, register

EPS = 1e-6
SQUASH = {"sigmoid": lambda h: h, "relu": lambda h: -torch.expm1(-h)}


def kl_bernoulli(rho: Union[float, torch.Tensor], rho_hat: torch.Tensor) -> torch.Tensor:
    """KL(ρ ‖ ρ̂) elementwise, for Bernoulli rates ρ (a number, or a tensor broadcasting
    against ρ̂) and ρ̂ (a tensor)."""
    r = rho_hat.clamp(EPS, 1 - EPS)
    return rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))


@register
class ActivityKL(ActivityPenalty):
    name = "activity_kl"

    @dataclass
    class Config:
        alpha: float = 1e-3
        rho: float = 0.05  # target mean activation of every hidden unit

    ranges = {"alpha": (lambda v: v >= 0, "a number >= 0"),
              "rho": (lambda v: 0 < v < 1, "a number in (0, 1)")}

    def attach(self, model) -> None:
        super().attach(model)
        # the model's own activation modules say what its hidden units emit
        found = {name for name, kind in ACTIVATIONS.items() if any(isinstance(m, kind) for m in model.modules())}
        if len(found) != 1 or not found <= set(SQUASH):
            raise ConfigError(f"regularizer.activity_kl needs hidden activations that are firing rates; "
                              f"this model's are {', '.join(sorted(found)) or 'none of ' + ', '.join(ACTIVATIONS)}: "
                              f"expected model.activation one of {', '.join(SQUASH)}")
        self.squash = SQUASH[found.pop()]

    def activity_of(self, hs: List[torch.Tensor], hp, stacked: bool, units: Units = None) -> torch.Tensor:
        rho = per_member(hp.rho, stacked, 2)
        out = 0
        for h, u in zip(hs, layer_units(units, len(hs))):
            rate = self.squash(h).flatten(int(stacked) + 1).mean(int(stacked))  # ρ̂: (units,) or (M, units)
            kl = kl_bernoulli(rho, rate)
            # a padded unit's ρ̂ = squash(0) = 0 would add KL(ρ ‖ ε): it is no unit, so it adds nothing
            out = out + member_sum(kl if u is None else kl * u.flatten(1), stacked)
        return per_member(hp.alpha, stacked, 1) * out
