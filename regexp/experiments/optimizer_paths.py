"""``+experiment=optimizer_paths``: optimizer trajectories on 2-D test functions over contours.

Saito (2016, *Deep Learning from Scratch*, §6.1.7, fig. 6-8), the course report after it,
Goodfellow et al. (2016, ch. 8) and Prince (2023, ch. 6) compare gradient descent, momentum,
AdaGrad, RMSprop and Adam by their paths on the elongated bowl x²/20 + y² from (−7, 2); the
first panel is that figure at the report's settings (30 steps), drawn with Nesterov and
AdaDelta too, and a saddle and the Rosenbrock valley follow. The point is a 2-D
``nn.Parameter`` stepped by the framework's own optimizers (``regexp.optim.build_optimizer``
on the composed ``configs/optimizer/<name>.yaml``), so the figure shows exactly the updates a
network would get.

Each optimizer's hyperparameters on each function are ``extra.settings.<function>.<optimizer>``
(any key of that optimizer's schema; unlisted keys keep its YAML's), so one command draws every
path and ``extra.settings.bowl.rmsprop.alpha=0.99`` changes one of them. The optimizer selected
on the command line still stands in for its own entry: ``optimizer=momentum optimizer.momentum=0.5``
sets that key on every function, over ``extra.settings``.

Writes ``paths.png`` (one contour panel per function; the legend below it, a path that leaves
the frame ends in an arrowhead on its edge), ``paths.csv`` (every iterate) and ``summary.csv``
(where each path ended, its distance to the minimum, whether and when it left the frame).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regexp.config import OPTIMIZER_SCHEMAS, check_optimizer, unknown_key_message
from regexp.errors import ConfigError
from regexp.experiments._figures import Outputs, subplots
from regexp.experiments._groups import selected_configs, with_settings
from regexp.experiments._settings import require, require_choices, settings
from regexp.optim import build_optimizer
from regexp.tasks import register_task

LABELS = {"sgd": "gd"}  # full-batch on a known function: plain gradient descent

# Every optimizer but SAM, whose step needs the loss again at w + ε (a closure); a path steps
# on a bare gradient.
PATH_OPTIMIZERS = {k: v for k, v in OPTIMIZER_SCHEMAS.items() if k != "sam"}


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


# The report's figure (Saito 2016, §6.1.7, fig. 6-8): x²/20 + y² from (-7, 2), 30 steps, GD
# η=0.95, momentum η=0.1 (μ=0.9), AdaGrad η=1.5, RMSprop ρ=0.9, Adam η=0.3, and ε=1e-7 added
# outside the square root as there. Nesterov takes momentum's values, AdaDelta Zeiler's (2012)
# ρ=0.9, ε=1e-6; RMSprop's η=0.1 is ours. Every function keeps these non-lr hyperparameters, so
# the panels differ only in the learning rates, which no single value suits on all of them.
HYPER: Dict[str, Dict[str, Any]] = {
    "sgd": {}, "momentum": {"momentum": 0.9}, "nesterov": {"momentum": 0.9},
    "adagrad": {"eps": 1e-7}, "rmsprop": {"alpha": 0.9, "eps": 1e-7},
    "adadelta": {"rho": 0.9, "eps": 1e-6}, "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-7}}
LR: Dict[str, Dict[str, float]] = {
    "bowl": {"sgd": 0.95, "momentum": 0.1, "nesterov": 0.1, "adagrad": 1.5, "rmsprop": 0.1,
             "adadelta": 10.0, "adam": 0.3},
    "ellipse": {"sgd": 0.4, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.4, "rmsprop": 0.1,
                "adadelta": 10.0, "adam": 0.3},
    "saddle": {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.5, "rmsprop": 0.05,
               "adadelta": 10.0, "adam": 0.1},
    "rosenbrock": {"sgd": 0.002, "momentum": 0.001, "nesterov": 0.001, "adagrad": 0.5,
                   "rmsprop": 0.01, "adadelta": 10.0, "adam": 0.3}}


@dataclass
class Settings:
    functions: List[str] = field(default_factory=lambda: ["bowl", "saddle", "rosenbrock"])
    optimizers: List[str] = field(default_factory=lambda: [
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam"])
    steps: Dict[str, int] = field(default_factory=lambda: {
        "bowl": 30, "ellipse": 40, "saddle": 60, "rosenbrock": 600})
    # function -> optimizer -> {hyperparameter: value} (the YAML's table, for task= alone);
    # keys not listed keep configs/optimizer/<name>.yaml's.
    settings: Dict[str, Dict[str, Dict[str, Any]]] = field(default_factory=lambda: {
        f: {o: {"lr": lr, **HYPER[o]} for o, lr in lrs.items()} for f, lrs in LR.items()})


def check_settings(table: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
    """Refuse an unknown function, optimizer or hyperparameter, a wrong type or a bad range,
    naming the ``extra.settings`` key and what is valid."""
    for fname, per_optimizer in table.items():
        if fname not in FUNCTIONS:
            raise ConfigError(unknown_key_message(f"extra.settings.{fname}", "extra.settings", list(FUNCTIONS)))
        for oname, values in per_optimizer.items():
            where = f"extra.settings.{fname}.{oname}"
            if oname not in PATH_OPTIMIZERS:
                raise ConfigError(unknown_key_message(where, f"extra.settings.{fname} (the optimizers)",
                                                      list(PATH_OPTIMIZERS)))
            base = OmegaConf.structured(PATH_OPTIMIZERS[oname])
            keys = [k for k in base if k != "name"]
            for key in values:
                if key not in keys:
                    raise ConfigError(unknown_key_message(f"{where}.{key}", f"optimizer={oname}", keys))
            try:
                merged = OmegaConf.merge(base, values)
            except OmegaConfBaseException as e:
                raise ConfigError(f"{where}.{e.key}={e.value!r} is invalid: expected a value of the "
                                  f"type in optimizer={oname}'s schema") from None
            check_optimizer(merged, where)


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


Box = Tuple[float, float, float, float]  # xmin, xmax, ymin, ymax


def frame(box: Box, paths: List[torch.Tensor], grow: float = 0.5) -> Box:
    """``box`` widened to take in every path, by at most ``grow`` of its span on each side:
    paths that overshoot a little stay whole in the picture, runaway ones do not squash it."""
    xmin, xmax, ymin, ymax = box
    pts = torch.cat(paths)
    pts = pts[torch.isfinite(pts).all(1)]
    dx, dy = (xmax - xmin) * grow, (ymax - ymin) * grow
    return (max(xmin - dx, min(xmin, pts[:, 0].min().item())), min(xmax + dx, max(xmax, pts[:, 0].max().item())),
            max(ymin - dy, min(ymin, pts[:, 1].min().item())), min(ymax + dy, max(ymax, pts[:, 1].max().item())))


def left_frame(points: torch.Tensor, box: Box) -> Optional[Tuple[int, Tuple[float, float]]]:
    """The first step outside ``box`` and where the segment to it crosses the edge, or None."""
    xmin, xmax, ymin, ymax = box
    x, y = points[:, 0], points[:, 1]
    out = ~((x >= xmin) & (x <= xmax) & (y >= ymin) & (y <= ymax))  # NaN counts as outside
    if not out.any():
        return None
    i = int(out.nonzero()[0, 0])
    (x0, y0), (x1, y1) = points[i - 1].tolist(), points[i].tolist()
    t = 1.0  # fraction of the segment inside the box
    for a0, a1, lo, hi in ((x0, x1, xmin, xmax), (y0, y1, ymin, ymax)):
        if not math.isfinite(a1):
            t = 0.0
        elif a1 > hi:
            t = min(t, (hi - a0) / (a1 - a0))
        elif a1 < lo:
            t = min(t, (lo - a0) / (a1 - a0))
    if t == 0.0:  # a jump to inf / NaN ends where the path last was
        return i, (x0, y0)
    return i, (x0 + t * (x1 - x0), y0 + t * (y1 - y0))


SYMBOLS = {"lr": "η", "momentum": "μ", "alpha": "ρ", "rho": "ρ", "beta1": "β₁", "beta2": "β₂",
           "eps": "ε", "weight_decay": "λ"}


def describe(ocfg: DictConfig) -> str:
    """The hyperparameters that shape the path, e.g. ``η=0.1, ρ=0.9, ε=1e-07``."""
    return ", ".join(f"{sym}={ocfg[k]:g}" for k, sym in SYMBOLS.items() if k in ocfg and ocfg[k] != 0)


def _contours(ax, fn: TestFunction, box: Box) -> None:
    xmin, xmax, ymin, ymax = box
    gx, gy = torch.meshgrid(torch.linspace(xmin, xmax, 200), torch.linspace(ymin, ymax, 200), indexing="xy")
    z = fn.f(gx, gy).numpy()
    if fn.log_levels:
        levels = np.logspace(-1, math.log10(max(z.max(), 1.0)), 15)
    else:
        levels = np.linspace(z.min(), z.max(), 20)
    ax.contour(gx.numpy(), gy.numpy(), z, levels=levels, colors="0.75", linewidths=0.7)
    if all(math.isfinite(v) for v in fn.minimum):
        ax.plot(*fn.minimum, marker="*", color="k", markersize=10, zorder=5, linestyle="none",
                label="minimum")
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)


def _draw(ax, p: torch.Tensor, box: Box, escaped: bool, label: str, color: str) -> Optional[int]:
    """Draw a path up to where it leaves ``box``; one that leaves ends in an arrowhead on the
    frame, one that blew up (``escaped``) in a cross, and the legend says which, at what step.
    Returns the step at which it left the frame, or None."""
    exit_ = left_frame(p, box)
    shown = p.numpy() if exit_ is None else np.vstack([p[:exit_[0]].numpy(), exit_[1]])
    notes = [] if exit_ is None else [f"left frame at step {exit_[0]}"]
    if escaped:
        notes.append(f"diverged after {len(p) - 1}")
    if notes:
        label += " — " + ", ".join(notes)
    style = "-o" if len(shown) <= 101 else "-"  # markers show the step sizes, until they crowd
    ax.plot(shown[:, 0], shown[:, 1], style, ms=2, lw=1.2, color=color, label=label)
    if exit_ is not None:
        ax.annotate("", xy=tuple(shown[-1]), xytext=tuple(shown[-2]), annotation_clip=False,
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=1.2, mutation_scale=14))
    elif escaped:  # from inside the frame straight to inf / NaN
        ax.plot(*shown[-1], "X", ms=8, color=color)
    return None if exit_ is None else exit_[0]


@register_task("optimizer_paths")
def optimizer_paths(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "optimizer_paths")
    require_choices("extra.functions", s.functions, FUNCTIONS)
    require_choices("extra.optimizers", s.optimizers, PATH_OPTIMIZERS)
    require(cfg.optimizer.name in PATH_OPTIMIZERS, "optimizer", cfg.optimizer.name,
            "one of " + ", ".join(PATH_OPTIMIZERS) + " (sam's two passes need a loss, not a test function's gradient)")
    require_choices("extra.steps", s.steps, FUNCTIONS)
    for name in s.functions:
        require(s.steps.get(name, 0) >= 1, f"extra.steps.{name}", s.steps.get(name), "an integer >= 1")
    check_settings(s.settings)
    rows, summary = [], []
    fig, axes = subplots(len(s.functions), size=4.2)
    fig.subplots_adjust(wspace=0.45)  # room for the legends below the panels, side by side
    colors = dict(zip(s.optimizers, [f"C{i}" for i in range(10)] * 2))
    composed = selected_configs(cfg, "optimizer", s.optimizers, overrides)  # once: composing is slow
    for ax, fname in zip(axes, s.functions):
        fn = FUNCTIONS[fname]
        configs = with_settings(cfg, "optimizer", composed, overrides, settings=s.settings.get(fname, {}))
        paths = {}
        for oname, ocfg in configs.items():
            pts = path(fn, ocfg, s.steps[fname])
            end = escaped_at(pts, fn)
            paths[oname] = (pts[:end], end < len(pts))
        box = frame(fn.box, [p for p, _ in paths.values()])
        _contours(ax, fn, box)
        for oname, (p, escaped) in paths.items():
            ocfg = configs[oname]
            vals = fn.f(p[:, 0], p[:, 1])
            for i in range(len(p)):
                rows.append({"function": fname, "optimizer": oname, "lr": ocfg.lr, "step": i,
                             "x": float(p[i, 0]), "y": float(p[i, 1]), "f": float(vals[i])})
            left = _draw(ax, p, box, escaped, f"{LABELS.get(oname, oname)} ({describe(ocfg)})",
                         colors.get(oname, "k"))
            final = p[-1].tolist()
            summary.append({"function": fname, "optimizer": oname, "settings": describe(ocfg),
                            "lr": ocfg.lr, "steps": len(p) - 1, "escaped": escaped,
                            "left_frame_at": "" if left is None else left,
                            "final_x": final[0], "final_y": final[1], "final_f": float(vals[-1]),
                            "final_distance": math.dist(final, fn.minimum)})
        ax.plot(*fn.start, "ks", ms=5, linestyle="none", label=f"start {fn.start}")
        ax.set_title(f"{fname}, {s.steps[fname]} steps")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        # below the axes, so no legend covers a path
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("paths", fig)
        out.table("paths", rows)
        out.table("summary", summary)
    return {"status": "completed", "paths": len(summary)}
