"""``+experiment=schedules``: the learning-rate curve of every scheduler config in one figure.

Each curve is ``optimizer.lr · lr_factor(t)`` from :func:`regexp.optim.lr_factor` — the same
function the trainer's LambdaLR steps through — for the config ``scheduler=<name>``
composes, over ``extra.total_steps`` steps. The scheduler chosen on the command line stands
in for its own entry (``scheduler=step scheduler.step_size=500`` redraws that curve).

Writes ``schedules.png`` and ``schedules.csv`` (column t, the step, then one column per schedule).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
from omegaconf import DictConfig

from regexp.experiments._figures import Outputs
from regexp.experiments._groups import selected_configs
from regexp.experiments._settings import require, require_choices, settings
from regexp.optim import SCHEDULES, lr_factor
from regexp.tasks import register_task


@dataclass
class Settings:
    schedulers: List[str] = field(default_factory=lambda: list(SCHEDULES))
    total_steps: int = 4000


def lr_curves(configs: Dict[str, DictConfig], base_lr: float, total_steps: int) -> Dict[str, List[float]]:
    """name -> the learning rate at every step 0 .. total_steps-1."""
    curves = {}
    for name, c in configs.items():
        factor = lr_factor(c, total_steps)
        curves[name] = [base_lr * factor(t) for t in range(total_steps)]
    return curves


def _label(name: str, c: DictConfig) -> str:
    detail = {"step": f"step_size={c.step_size}, γ={c.gamma:g}",
              "cosine_restarts": f"period={c.period}, ×{c.period_mult:g}",
              "warmup_cosine": f"warmup={c.warmup_steps}"}.get(name, "")
    return f"{name} ({detail})" if detail else name


@register_task("schedules")
def schedules(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "schedules")
    require(s.total_steps >= 2, "extra.total_steps", s.total_steps, "an integer >= 2")
    require_choices("extra.schedulers", s.schedulers, SCHEDULES)
    configs = selected_configs(cfg, "scheduler", s.schedulers, overrides)
    curves = lr_curves(configs, cfg.optimizer.lr, s.total_steps)
    fig, axes = plt.subplots(len(curves), 1, figsize=(7, 1.5 * len(curves) + 0.5), sharex=True, squeeze=False)
    for ax, (name, lrs) in zip(axes[:, 0], curves.items()):
        ax.plot(range(s.total_steps), lrs, color="C0")
        ax.set_ylabel("lr")
        ax.set_ylim(0, cfg.optimizer.lr * 1.08)
        ax.set_title(_label(name, configs[name]), fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(f"step (of {s.total_steps}; optimizer.lr={cfg.optimizer.lr:g})")
    fig.tight_layout()
    # "t", not "step": one of the schedules is called step.
    rows = [{"t": t, **{name: lrs[t] for name, lrs in curves.items()}} for t in range(s.total_steps)]
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("schedules", fig)
        out.table("schedules", rows)
    return {"status": "completed", "schedules": len(curves)}
