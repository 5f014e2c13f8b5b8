"""Early stopping: stop when the validation metric has not improved for ``patience`` evaluations.

The trainer then loads the best-validation weights back (``restores_best``) before the final
evaluation, so ``metrics.json``'s ``final`` is the best epoch's row and ``model.pt`` holds its
weights; ``stopped_epoch`` records where training stopped. The trainer's best epoch is chosen
by the same ``monitor`` (``selects_best_by``), so the weights kept are the ones that stopped it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from regexp.regularizers.base import Regularizer, register


@register
class EarlyStopping(Regularizer):
    name = "early_stopping"
    restores_best = True

    @dataclass
    class Config:
        monitor: str = "val_acc"  # val_acc (higher is better) or val_loss (lower is better)
        patience: int = 10  # evaluations without improvement before stopping
        min_delta: float = 0.0  # an improvement must exceed this

    ranges = {
        "monitor": (lambda v: v in ("val_loss", "val_acc"), "one of val_loss, val_acc"),
        "patience": (lambda v: v >= 1, "an integer >= 1"),
        "min_delta": (lambda v: v >= 0, "a number >= 0"),
    }

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.best = math.inf
        self.since_best = 0

    @property
    def selects_best_by(self) -> str:
        return self.cfg.monitor

    def epoch_end(self, model, row) -> bool:
        if self.cfg.monitor not in row:  # no validation split: nothing to watch
            return False
        score = row[self.cfg.monitor] * (1 if self.cfg.monitor == "val_loss" else -1)
        if score < self.best - self.cfg.min_delta:
            self.best, self.since_best = score, 0
        else:
            self.since_best += 1
        return self.since_best >= self.cfg.patience

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"early_stopping/evals_since_best": self.since_best}, epoch)

    def state_dict(self):
        return {"best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state) -> None:
        self.best, self.since_best = state["best"], state["since_best"]
