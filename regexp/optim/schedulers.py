"""Per-step learning-rate schedules as pure functions of the step: lr_t = lr · factor(t).

Any schedule can start with ``warmup_steps`` of linear warmup (factor (t+1)/W); the
schedule proper then runs over the remaining steps:

- ``constant``: 1
- ``step``: γ^⌊t / step_size⌋
- ``cosine`` / ``warmup_cosine``: r + ½(1 − r)(1 + cos(π t / T)), r = ``min_lr_ratio``
- ``cosine_restarts`` (SGDR): the cosine restarted every cycle, cycle i lasting
  ``period · period_mult^i`` steps
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "cosine_restarts")


def _cosine(t: float, T: float, r: float) -> float:
    return r + 0.5 * (1.0 - r) * (1.0 + math.cos(math.pi * min(t / max(T, 1), 1.0)))


def lr_factor(cfg, total_steps: int) -> Callable[[int], float]:
    w = cfg.warmup_steps

    def after_warmup(t: int) -> float:
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** (t // cfg.step_size)
        if cfg.name in ("cosine", "warmup_cosine"):
            return _cosine(t, total_steps - w, cfg.min_lr_ratio)
        if cfg.name == "cosine_restarts":
            period = float(cfg.period)
            while t >= period:
                t -= period
                period *= cfg.period_mult
            return _cosine(t, period, cfg.min_lr_ratio)
        raise ValueError(cfg.name)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return after_warmup(step - w)

    return factor


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))
