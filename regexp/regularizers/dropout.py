"""Inverted dropout on hidden units (and optionally the input).

In training each unit is zeroed with probability p and the kept ones are scaled by
1/(1-p), so the expected activation is unchanged and evaluation is the identity (the
weight-scaling rule). Every model routes its activations through ``Site`` modules; this
regularizer only sets their probability. With ``mc_samples`` = T > 0 the report also gives
Monte-Carlo dropout's accuracy (mean of T stochastic passes) beside the weight-scaling one.
"""
from __future__ import annotations

from dataclasses import dataclass

from regexp.models.sites import hidden_sites, sites
from regexp.regularizers.base import Regularizer, register
from regexp.regularizers.mc_dropout import mc_evaluate

_P = (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


@register
class Dropout(Regularizer):
    name = "dropout"

    @dataclass
    class Config:
        p: float = 0.5  # hidden units
        input_p: float = 0.0  # input features
        mc_samples: int = 0  # T stochastic passes for the Monte-Carlo evaluation; 0: none

    ranges = {"p": _P, "input_p": _P, "mc_samples": (lambda v: v >= 0, "an integer >= 0")}

    def attach(self, model) -> None:
        for s in hidden_sites(model, self.name) if self.cfg.p > 0 else sites(model, "hidden"):
            s.p = self.cfg.p
        for s in sites(model, "input"):
            s.p = self.cfg.input_p

    def report(self, model, tensors, evaluate):
        if not self.cfg.mc_samples:
            return {}
        out = {}
        for split in ("val", "test"):
            x, y = tensors[split]
            if len(y):
                loss, acc = evaluate(model, x, y)
                out[f"dropout/weight_scaling_{split}_acc"] = acc.item()
                out[f"dropout/weight_scaling_{split}_loss"] = loss.item()
                loss, acc = mc_evaluate(model, x, y, self.cfg.mc_samples)
                out[f"dropout/mc_{split}_acc"] = acc.item()
                out[f"dropout/mc_{split}_loss"] = loss.item()
        return out

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"dropout/p": self.cfg.p, "dropout/input_p": self.cfg.input_p}, epoch)
