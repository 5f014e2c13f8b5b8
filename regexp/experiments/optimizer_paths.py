"""``+experiment=optimizer_paths``: optimizer trajectories on 2-D test functions over contours.

Prince (UDL) ch. 6 and Goodfellow et al. ch. 8 draw gradient descent, momentum, Nesterov,
AdaGrad, RMSprop, AdaDelta and Adam on an elongated bowl, a saddle and the Rosenbrock
valley. Here the point is a 2-D ``nn.Parameter`` stepped by the framework's own optimizers
(``regexp.optim.build_optimizer`` on the composed ``configs/optimizer/<name>.yaml``), so the
figure shows exactly the updates a network would get, and ``optimizer=... optimizer.<key>=...``
overrides change the path of that optimizer. Learning rates are per function and optimizer
(``extra.lr``), because no single rate suits both the bowl and Rosenbrock.

Writes ``paths.png`` (one contour panel per function), ``paths.csv`` (every iterate) and
``summary.csv`` (where each path ended).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from regexp.experiments._figures import Outputs, subplots
from regexp.experiments._groups import selected_configs
from regexp.experiments._settings import require, require_choices, settings
from regexp.optim import build_optimizer
from regexp.tasks import register_task

LABELS = {"sgd": "gd"}  # full-batch on a known function: plain gradient descent


@dataclass(frozen=True)
class TestFunction:
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # elementwise, works on grids too
    start: Tuple[float, float]
    box: Tuple[float, float, float, float]  # xmin, xmax, ymin, ymax of the plot
    minimum: Tuple[float, float]
    log_levels: bool = False  # Rosenbrock's valley needs log-spaced contours


FUNCTIONS: Dict[str, TestFunction] = {
    # Goodfellow fig. 8.5-style elongated bowl: curvature 1/10 along x, 2 along y.
    "bowl": TestFunction(lambda x, y: x ** 2 / 20 + y ** 2, (-7.0, 2.0), (-8, 2, -3, 3), (0, 0)),
    # The ill-conditioned quadratic E(w) = 0.1 w1² + 2 w2² of Zhang et al. (d2l) ch. 12.
    "ellipse": TestFunction(lambda x, y: 0.1 * x ** 2 + 2 * y ** 2, (-5.0, -2.0), (-6, 1, -3, 3), (0, 0)),
    # Start almost on the saddle's stable direction: methods differ in how fast they escape.
    "saddle": TestFunction(lambda x, y: x ** 2 - y ** 2, (-1.5, 0.05), (-2, 2, -2, 2), (math.nan, math.nan)),
    "rosenbrock": TestFunction(lambda x, y: (1 - x) ** 2 + 100 * (y - x ** 2) ** 2, (-1.5, 2.0),
                               (-2, 2, -1, 3), (1, 1), log_levels=True),
}


@dataclass
class Settings:
    functions: List[str] = field(default_factory=lambda: ["bowl", "saddle", "rosenbrock"])
    optimizers: List[str] = field(default_factory=lambda: [
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam"])
    steps: Dict[str, int] = field(default_factory=lambda: {
        "bowl": 60, "ellipse": 40, "saddle": 60, "rosenbrock": 600})
    # function -> optimizer -> learning rate (the YAML's table; here the same, for task= alone)
    lr: Dict[str, Dict[str, float]] = field(default_factory=lambda: {
        "bowl": {"sgd": 0.4, "momentum": 0.05, "nesterov": 0.05, "adagrad": 1.0, "rmsprop": 0.1,
                 "adadelta": 10.0, "adam": 0.3},
        "ellipse": {"sgd": 0.4, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.4, "rmsprop": 0.1,
                    "adadelta": 10.0, "adam": 0.3},
        "saddle": {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.5, "rmsprop": 0.05,
                   "adadelta": 10.0, "adam": 0.1},
        "rosenbrock": {"sgd": 0.002, "momentum": 0.001, "nesterov": 0.001, "adagrad": 0.5,
                       "rmsprop": 0.01, "adadelta": 10.0, "adam": 0.3}})


def path(fn: TestFunction, opt_cfg: DictConfig, steps: int, start=None) -> torch.Tensor:
    """The ``steps + 1`` iterates (start included) of the optimizer ``opt_cfg`` on ``fn``."""
    w = torch.nn.Parameter(torch.tensor(start or fn.start, dtype=torch.float64))
    opt = build_optimizer(opt_cfg, [{"params": [w]}], torch.device("cpu"))
    points = [w.detach().clone()]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        fn.f(w[0], w[1]).backward()
        opt.step()
        points.append(w.detach().clone())  # no sync: the path is read once, after the loop
    return torch.stack(points)


def escaped_at(points: torch.Tensor, fn: TestFunction, margin: float = 10.0) -> int:
    """Index of the first iterate far outside the plot (diverged / escaped), or len(points)."""
    xmin, xmax, ymin, ymax = fn.box
    span = max(xmax - xmin, ymax - ymin) * margin
    bad = ~torch.isfinite(points).all(1) | (points.abs().max(1).values > span)
    return int(bad.nonzero()[0, 0]) + 1 if bad.any() else len(points)


def _contours(ax, fn: TestFunction) -> None:
    xmin, xmax, ymin, ymax = fn.box
    gx, gy = torch.meshgrid(torch.linspace(xmin, xmax, 200), torch.linspace(ymin, ymax, 200), indexing="xy")
    z = fn.f(gx, gy).numpy()
    if fn.log_levels:
        levels = np.logspace(-1, math.log10(max(z.max(), 1.0)), 15)
    else:
        levels = np.linspace(z.min(), z.max(), 20)
    ax.contour(gx.numpy(), gy.numpy(), z, levels=levels, colors="0.75", linewidths=0.7)
    if all(math.isfinite(v) for v in fn.minimum):
        ax.plot(*fn.minimum, marker="*", color="k", markersize=10, zorder=5)
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)


@register_task("optimizer_paths")
def optimizer_paths(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "optimizer_paths")
    require_choices("extra.functions", s.functions, FUNCTIONS)
    for name in s.functions:
        require(s.steps.get(name, 0) >= 1, f"extra.steps.{name}", s.steps.get(name), "an integer >= 1")
    rows, summary = [], []
    fig, axes = subplots(len(s.functions), size=4.2)
    colors = dict(zip(s.optimizers, [f"C{i}" for i in range(10)] * 2))
    for ax, fname in zip(axes, s.functions):
        fn = FUNCTIONS[fname]
        configs = selected_configs(cfg, "optimizer", s.optimizers, overrides, s.lr.get(fname, {}))
        _contours(ax, fn)
        for oname, ocfg in configs.items():
            require(ocfg.lr > 0, f"extra.lr.{fname}.{oname}", ocfg.lr, "a number > 0")
            pts = path(fn, ocfg, s.steps[fname])
            end = escaped_at(pts, fn)
            vals = fn.f(pts[:, 0], pts[:, 1])
            for i in range(end):
                rows.append({"function": fname, "optimizer": oname, "lr": ocfg.lr, "step": i,
                             "x": float(pts[i, 0]), "y": float(pts[i, 1]), "f": float(vals[i])})
            summary.append({"function": fname, "optimizer": oname, "lr": ocfg.lr, "steps": end - 1,
                            "escaped": end < len(pts), "final_x": float(pts[end - 1, 0]),
                            "final_y": float(pts[end - 1, 1]), "final_f": float(vals[end - 1])})
            p = pts[:end].numpy()
            style = "-o" if len(p) <= 101 else "-"  # markers show the step sizes, until they crowd
            ax.plot(p[:, 0], p[:, 1], style, ms=2, lw=1.2, color=colors.get(oname, "k"),
                    label=f"{LABELS.get(oname, oname)} (η={ocfg.lr:g})")
        ax.plot(*fn.start, "ks", ms=5)
        ax.set_title(f"{fname}, {s.steps[fname]} steps")
        ax.legend(fontsize=7, loc="lower right" if fname != "rosenbrock" else "upper right")
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("paths", fig)
        out.table("paths", rows)
        out.table("summary", summary)
    return {"status": "completed", "paths": len(summary)}
