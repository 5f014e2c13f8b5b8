"""``+experiment=gradient_flow``: gradient descent, gradient flow and the modified loss (Prince figs 9.3-9.4).

Gradient flow dφ/dt = −∇L is gradient descent with infinitely small steps. With a finite step
α the iterates leave that path; Barrett & Dherin (2021, "Implicit gradient regularization")
show that they follow, to one order higher in α, the flow of the modified loss
L̃ = L + (α/4)‖∇L‖², so gradient descent implicitly penalizes steep regions (Prince, UDL
§9.2, figs 9.3-9.4). On a 2-parameter least-squares fit this draws (a) the plain flow, solved
with RK4 at ``extra.substeps`` steps per α of time, (b) gradient descent at step α, and
(c) the flow of L̃, whose gradient comes from a double backward through autograd, and
measures how far each flow is from the gradient-descent iterate w_k at the matched time kα.
The last panel repeats that at smaller α over the same total time: the plain flow's distance
shrinks like α, the modified flow's like α².

Models (``extra.model``), both fit by mean squared error to noisy points drawn once:
- ``product``: f(x; φ) = φ0·φ1·x, a one-unit two-layer linear network. Its global minima form the
  curved valley φ0·φ1 = slope (a hyperbola), so, as in fig 9.3, where a path *ends* depends on
  the step: the flow conserves φ0² − φ1², gradient descent drifts to flatter, more balanced minima.
- ``gabor``: f(x; φ) = sin(φ0 + 0.06·φ1·x)·exp(−(φ0 + 0.06·φ1·x)²/32), the model of Prince §6.1.2
  and fig 9.4, with isolated minima: the paths differ on the way.

Writes ``gradient_flow.png``, ``paths.csv`` (every path at the times kα, with its distance to
gradient descent) and ``distances.csv`` (max / mean / final distance of each flow, per α).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from regexp.experiments._figures import Outputs, subplots
from regexp.experiments._settings import require, require_choices, settings
from regexp.tasks import register_task

Loss = Callable[[torch.Tensor], torch.Tensor]  # parameters (2,) -> scalar


def _gabor(x, p0, p1):
    z = p0 + 0.06 * p1 * x
    return torch.sin(z) * torch.exp(-z * z / 32)


@dataclass(frozen=True)
class Model:
    f: Callable  # f(x, φ0, φ1), broadcasting so that the loss can be drawn on a grid
    truth: Tuple[float, float]  # parameters that generate the data
    x_range: Tuple[float, float]
    start: Tuple[float, float]
    alpha: float  # defaults: a step where the paths visibly part but gradient descent does not oscillate
    steps: int
    box: Tuple[float, float, float, float]  # φ0 min, max, φ1 min, max of the plot


MODELS: Dict[str, Model] = {
    "product": Model(lambda x, p0, p1: p0 * p1 * x, (1.0, 1.0), (-1.0, 1.0), (2.5, -1.5), 0.1, 60,
                     (1.25, 3.0, -1.75, 1.0)),
    "gabor": Model(_gabor, (0.0, 16.6), (-15.0, 15.0), (3.0, 20.0), 2.0, 15, (-1.0, 4.0, 17.0, 22.0)),
}


@dataclass
class Settings:
    model: str = "product"
    alpha: Optional[float] = None  # the gradient-descent step; None: the model's default
    steps: Optional[int] = None  # gradient-descent steps; the flows run for the same time α·steps
    start: Optional[List[float]] = None  # [φ0, φ1]; None: the model's default
    substeps: int = 4  # RK4 steps per α of time for both flows
    alpha_fractions: List[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    n_points: int = 10
    noise: float = 0.1  # std of the noise on the targets
    seed: int = 0
    grid: int = 120  # contour resolution per axis


def least_squares(model: Model, n_points: int, noise: float, seed: int) -> Callable:
    """L(φ0, φ1): the mean squared error of ``model`` on its data; broadcasts over grids of φ."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = model.x_range
    x = lo + (hi - lo) * torch.rand(n_points, generator=g, dtype=torch.float64)
    y = model.f(x, *model.truth) + noise * torch.randn(n_points, generator=g, dtype=torch.float64)
    return lambda p0, p1: (model.f(x, p0[..., None], p1[..., None]) - y).pow(2).mean(-1)


def modified_loss(loss: Loss, alpha: float) -> Loss:
    """L̃ = L + (α/4)‖∇L‖²; create_graph keeps ∇L differentiable, so ∇L̃ is a double backward."""
    def l_tilde(w: torch.Tensor) -> torch.Tensor:
        value = loss(w)
        (g,) = torch.autograd.grad(value, w, create_graph=True)
        return value + alpha / 4 * g.pow(2).sum()
    return l_tilde


def gradient(loss: Loss, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().requires_grad_(True)
    return torch.autograd.grad(loss(w), w)[0]


def gradient_descent(loss: Loss, w0: torch.Tensor, alpha: float, steps: int) -> torch.Tensor:
    """The iterates w_0 … w_steps of w ← w − α∇L."""
    points = [w0]
    for _ in range(steps):
        points.append(points[-1] - alpha * gradient(loss, points[-1]))
    return torch.stack(points)


def gradient_flow(loss: Loss, w0: torch.Tensor, time: float, n: int) -> torch.Tensor:
    """dw/dt = −∇L from w0 for ``time``, by ``n`` RK4 steps; the n + 1 points, w0 included."""
    h, points = time / n, [w0]
    for _ in range(n):
        w = points[-1]
        k1 = gradient(loss, w)
        k2 = gradient(loss, w - h / 2 * k1)
        k3 = gradient(loss, w - h / 2 * k2)
        k4 = gradient(loss, w - h * k3)
        points.append(w - h / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
    return torch.stack(points)


def flows(loss: Loss, w0: torch.Tensor, alpha: float, steps: int, substeps: int):
    """The flows of L and of L̃ over the time α·steps: densely, and at the times kα of the iterates."""
    dense = {name: gradient_flow(fn, w0, alpha * steps, steps * substeps)
             for name, fn in (("gradient flow", loss), ("modified flow", modified_loss(loss, alpha)))}
    return dense, {name: path[::substeps] for name, path in dense.items()}


def _contours(ax, gx, gy, z, title, log=True):
    levels = np.geomspace(max(z.min(), z.max() * 1e-4), z.max(), 18) if log else 18
    ax.contour(gx, gy, z, levels=levels, colors="0.7", linewidths=0.7)
    ax.set(title=title, xlabel="φ0", ylabel="φ1", xlim=(gx.min(), gx.max()), ylim=(gy.min(), gy.max()))


@register_task("gradient_flow")
def gradient_flow_task(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "gradient_flow")
    require_choices("extra.model", [s.model], MODELS)
    model = MODELS[s.model]
    alpha = model.alpha if s.alpha is None else s.alpha
    steps = model.steps if s.steps is None else s.steps
    start = model.start if s.start is None else tuple(s.start)
    require(alpha > 0, "extra.alpha", alpha, "a number > 0")
    require(steps >= 1, "extra.steps", steps, "an integer >= 1")
    require(len(start) == 2, "extra.start", s.start, "two numbers [φ0, φ1]")
    require(s.substeps >= 1, "extra.substeps", s.substeps, "an integer >= 1")
    require(all(0 < a <= 1 for a in s.alpha_fractions), "extra.alpha_fractions", s.alpha_fractions,
            "numbers in (0, 1]: multiples of extra.alpha, run over the same total time")
    require(s.n_points >= 1, "extra.n_points", s.n_points, "an integer >= 1")
    require(s.noise >= 0, "extra.noise", s.noise, "a number >= 0")
    require(s.grid >= 10, "extra.grid", s.grid, "an integer >= 10")
    torch.set_num_threads(1)  # a 2-parameter problem: autograd overhead, not arithmetic
    surface = least_squares(model, s.n_points, s.noise, s.seed)
    loss: Loss = lambda w: surface(w[0], w[1])  # noqa: E731
    w0 = torch.tensor(start, dtype=torch.float64)

    gd = gradient_descent(loss, w0, alpha, steps)
    require(bool(torch.isfinite(gd).all()), "extra.alpha", alpha, "a smaller step: gradient descent diverged")
    dense, matched = flows(loss, w0, alpha, steps, s.substeps)
    rows = []
    for name, path in (("gradient descent", gd), *matched.items()):
        values = surface(path[:, 0], path[:, 1])
        for k, (w, v) in enumerate(zip(path.tolist(), values.tolist())):
            rows.append({"path": name, "alpha": alpha, "step": k, "time": k * alpha, "phi0": w[0], "phi1": w[1],
                         "loss": v, "distance_to_gd": math.dist(w, gd[k].tolist())})

    # The same total time at smaller steps: how each flow's gap to gradient descent scales with α.
    distances = []
    for frac in s.alpha_fractions:
        a, n = alpha * frac, max(1, round(steps / frac))
        if frac == 1:  # the figure's own step, computed above
            gd_a, at = gd, matched
        else:
            gd_a, at = gradient_descent(loss, w0, a, n), flows(loss, w0, a, n, s.substeps)[1]
        for name, path in at.items():
            d = (path - gd_a).norm(dim=1)
            distances.append({"alpha": a, "steps": n, "flow": name, "max_distance": float(d.max()),
                              "mean_distance": float(d.mean()), "final_distance": float(d[-1])})

    xmin, xmax, ymin, ymax = model.box
    p0, p1 = torch.meshgrid(torch.linspace(xmin, xmax, s.grid, dtype=torch.float64),
                            torch.linspace(ymin, ymax, s.grid, dtype=torch.float64), indexing="xy")
    p0.requires_grad_(True), p1.requires_grad_(True)
    z = surface(p0, p1)
    g0, g1 = torch.autograd.grad(z.sum(), (p0, p1))  # grid points are independent: per-point ∇L
    penalty = (alpha / 4 * (g0 ** 2 + g1 ** 2)).detach().numpy()
    gx, gy, z = p0.detach().numpy(), p1.detach().numpy(), z.detach().numpy()
    style = {"gradient flow": dict(color="C0", ls="--", lw=1.6), "modified flow": dict(color="C3", lw=1.6)}
    fig, axes = subplots(4, cols=4, size=4.0, constrained_layout=True)
    _contours(axes[0], gx, gy, z, f"(a) L: {steps} steps of α, flows to time {alpha * steps:g}")
    _contours(axes[1], gx, gy, penalty, f"(b) (α/4)‖∇L‖², α = {alpha:g}")
    _contours(axes[2], gx, gy, z + penalty, "(c) L̃ = L + (α/4)‖∇L‖²")
    for ax, names in ((axes[0], ("gradient flow", "modified flow")), (axes[2], ("modified flow",))):
        ax.plot(gd[:, 0], gd[:, 1], "-o", color="C2", ms=2.5, lw=1, label=f"gradient descent, α = {alpha:g}")
        for name in names:
            ax.plot(dense[name][:, 0], dense[name][:, 1], label=name, **style[name])
        ax.plot(*start, "ks", ms=5)
        ax.legend(fontsize=7)
    ax = axes[3]
    orders = {}
    for name in dense:
        mine = [r for r in distances if r["flow"] == name]
        a, d = np.log([r["alpha"] for r in mine]), np.log([r["max_distance"] for r in mine])
        orders[name] = float(np.polyfit(a, d, 1)[0]) if len(mine) > 1 else math.nan
        ax.loglog(np.exp(a), np.exp(d), marker="o", label=f"{name} (slope {orders[name]:.2f})", **style[name])
    ax.set(title="(d) gap to gradient descent vs α", xlabel="step α (same total time)",
           ylabel="max_k ‖w_k − flow(kα)‖")
    ax.legend(fontsize=7)
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("gradient_flow", fig)
        out.table("paths", rows)
        out.table("distances", distances)
    return {"status": "completed", "order": orders,
            "max_distance": {name: float((path - gd).norm(dim=1).max()) for name, path in matched.items()}}
