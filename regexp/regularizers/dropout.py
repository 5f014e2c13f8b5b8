"""Inverted dropout on hidden units (and optionally the input).

In training each unit is zeroed with probability p and the kept ones are scaled by
1/(1-p), so the expected activation is unchanged and evaluation is the identity (the
weight-scaling rule). Every model routes its activations through ``Site`` modules; this
regularizer only sets their probability.
"""
from __future__ import annotations

from dataclasses import dataclass

from regexp.models.sites import sites
from regexp.regularizers.base import Regularizer, register

_P = (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


@register
class Dropout(Regularizer):
    name = "dropout"

    @dataclass
    class Config:
        p: float = 0.5  # hidden units
        input_p: float = 0.0  # input features

    ranges = {"p": _P, "input_p": _P}

    def attach(self, model) -> None:
        for s in sites(model, "hidden"):
            s.p = self.cfg.p
        for s in sites(model, "input"):
            s.p = self.cfg.input_p
