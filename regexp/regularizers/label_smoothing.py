"""Label smoothing: train against (1-ε)·onehot(y) + ε/K instead of the one-hot target."""
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

    def loss_kwargs(self):
        return {"label_smoothing": self.cfg.eps}
