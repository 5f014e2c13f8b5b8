"""Optimizers and per-step learning-rate schedules, chosen by name."""
from regexp.optim.optimizers import OPTIMIZERS, build_optimizer
from regexp.optim.schedulers import SCHEDULES, build_scheduler, lr_factor

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "lr_factor"]
