"""Label smoothing: train against (1-ε)·onehot(y) + ε/K instead of the one-hot target.

The population's data loss applies it, each member with its own ε (``LossTerms.loss`` in
regexp/population/engine.py)."""
from __future__ import annotations

from dataclasses import dataclass

from regexp.regularizers.base import Regularizer, register


@register
class LabelSmoothing(Regularizer):
    name = "label_smoothing"

    @dataclass
    class Config:
        eps: float = 0.1

    ranges = {"eps": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")}
