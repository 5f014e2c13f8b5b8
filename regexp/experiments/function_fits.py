"""``+experiment=function_fits``: one 1-D regression problem with few noisy points, fitted with
no regularization, L2 at several λ, dropout, input noise, early stopping and bagging, plus
a Bayesian-style band (mean ± 2 std) from the bagged ensemble and from MC dropout.

These are the pictures of Bishop ch. 9, Prince ch. 9 and Goodfellow ch. 7: ``extra.n_points``
noisy samples of sin(2πx) and a small MLP that can pass through all of them. A regression
target is not a classification dataset, so the fits are trained here, full-batch on the
mean squared error, for ``extra.steps`` steps; the network is ``regexp.models.build_model``'s
MLP with one output (``model.*`` overrides apply), the optimizer is the composed
``cfg.optimizer`` through ``regexp.optim.build_optimizer``, and dropout uses the model's
``Site`` modules as the dropout regularizer does.

Writes ``fits.png`` (one panel per method), ``curves.csv`` (x, the true function and every
fit on a grid, with the bands' std) and ``summary.csv`` (training, validation and true-function
MSE per method).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from regexp.experiments._figures import Outputs, subplots
from regexp.experiments._settings import require, settings
from regexp.models import build_model, sites
from regexp.optim import build_optimizer
from regexp.tasks import register_task
from regexp.train.threads import set_threads
from regexp.train.trainer import seed_everything


@dataclass
class Settings:
    n_points: int = 12
    n_val: int = 12  # held-out noisy points: early stopping's validation set
    noise: float = 0.2  # std of the noise on the targets
    steps: int = 3000  # full-batch steps of every fit
    l2: List[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    dropout: float = 0.2
    input_noise: float = 0.05  # std of Gaussian noise added to x at every step
    eval_every: int = 20  # early stopping: validation loss (and a weight snapshot) every so many steps
    ensemble: int = 10  # bagged models, each on a bootstrap resample
    mc_samples: int = 100  # stochastic forward passes of MC dropout
    grid: int = 200


@dataclass
class Problem:
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    grid: torch.Tensor

    @staticmethod
    def truth(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(2 * math.pi * x)

    def rows(self) -> List[Dict[str, object]]:
        """The training and validation points, one table row each."""
        return [{"split": split, "x": float(a), "y": float(b)}
                for split, xs, ys in (("train", self.x, self.y), ("val", self.x_val, self.y_val))
                for a, b in zip(xs[:, 0], ys[:, 0])]


def make_problem(s: Settings, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def sample(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 1, generator=g)
        return x, Problem.truth(x) + s.noise * torch.randn(n, 1, generator=g)

    x, y = sample(s.n_points)
    x_val, y_val = sample(s.n_val)
    return Problem(x, y, x_val, y_val, torch.linspace(0, 1, s.grid).unsqueeze(1))


def fit(cfg: DictConfig, p: Problem, steps: int, seed: int, l2: float = 0.0, dropout: float = 0.0,
        input_noise: float = 0.0, sample: Optional[torch.Tensor] = None,
        eval_every: int = 0) -> Tuple[nn.Module, int]:
    """Train one MLP full-batch on MSE; return it and the step it was taken at.

    ``sample`` picks (with repetition) the training points, for bagging. With ``eval_every``
    the weights with the lowest validation loss are restored (early stopping); the losses
    and snapshots stay tensors until the loop ends, so no step waits for a read-back.
    """
    seed_everything(seed)
    model = build_model(cfg.model, (1,), 1)
    for site in sites(model, "hidden"):
        site.p = dropout
    opt = build_optimizer(cfg.optimizer, [{"params": list(model.parameters())}], torch.device("cpu"))
    x, y = (p.x, p.y) if sample is None else (p.x[sample], p.y[sample])
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    val_losses, snapshots = [], []
    model.train()
    for step in range(1, steps + 1):
        xb = x + input_noise * torch.randn_like(x) if input_noise else x
        loss = F.mse_loss(model(xb), y)
        if l2:
            loss = loss + 0.5 * l2 * sum(w.pow(2).sum() for w in weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if eval_every and step % eval_every == 0:
            model.eval()
            with torch.no_grad():
                val_losses.append(F.mse_loss(model(p.x_val), p.y_val))
                snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            model.train()
    model.eval()
    if not val_losses:
        return model, steps
    best = int(torch.stack(val_losses).argmin())
    model.load_state_dict(snapshots[best])
    return model, (best + 1) * eval_every


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).squeeze(1)


@torch.no_grad()
def mc_dropout(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    """``samples`` predictions with dropout left on (Gal & Ghahramani), shape (samples, len(x))."""
    hidden = sites(model, "hidden")
    for site in hidden:
        site.mc = True
    try:
        return torch.stack([predict(model, x) for _ in range(samples)])
    finally:
        for site in hidden:
            site.mc = False


def bagged(cfg: DictConfig, p: Problem, s: Settings) -> List[nn.Module]:
    """``s.ensemble`` fits, each on its own bootstrap resample of the training points."""
    boot = torch.Generator().manual_seed(cfg.seed + 1)
    return [fit(cfg, p, s.steps, cfg.seed + 1 + i,
                sample=torch.randint(0, s.n_points, (s.n_points,), generator=boot))[0]
            for i in range(s.ensemble)]


def _check(s: Settings, cfg: DictConfig) -> None:
    require(cfg.model.name == "mlp", "model.name", cfg.model.name, "mlp (fitted to 1-D inputs)")
    require(cfg.optimizer.name != "sam", "optimizer", cfg.optimizer.name,
            "an optimizer other than sam (this task's own loop takes one pass per step)")
    # depth 0 is a straight line, and the dropout fits would have no hidden unit to drop
    require(cfg.model.depth >= 1, "model.depth", cfg.model.depth, "an integer >= 1 (hidden units to fit with)")
    for key in ("n_points", "n_val", "steps", "ensemble", "mc_samples", "grid", "eval_every"):
        require(getattr(s, key) >= 1, f"extra.{key}", getattr(s, key), "an integer >= 1")
    require(0.0 <= s.dropout < 1.0, "extra.dropout", s.dropout, "a number in [0, 1)")
    require(s.noise >= 0 and s.input_noise >= 0, "extra.noise/input_noise", (s.noise, s.input_noise),
            "numbers >= 0")
    require(all(v > 0 for v in s.l2), "extra.l2", s.l2, "numbers > 0")


@register_task("function_fits")
def function_fits(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "function_fits")
    _check(s, cfg)
    # a few hundred 1-D points through a small MLP: far below auto's threshold for a 2nd thread
    set_threads(cfg.trainer.threads, torch.device("cpu"), lambda: 0.0)
    p = make_problem(s, cfg.seed)
    fits: Dict[str, Tuple[nn.Module, int]] = {"none": fit(cfg, p, s.steps, cfg.seed)}
    for lam in s.l2:
        fits[f"l2 λ={lam:g}"] = fit(cfg, p, s.steps, cfg.seed, l2=lam)
    fits[f"dropout p={s.dropout:g}"] = fit(cfg, p, s.steps, cfg.seed, dropout=s.dropout)
    fits[f"input noise σ={s.input_noise:g}"] = fit(cfg, p, s.steps, cfg.seed, input_noise=s.input_noise)
    fits["early stopping"] = fit(cfg, p, s.steps, cfg.seed, eval_every=s.eval_every)
    curves = {name: predict(m, p.grid) for name, (m, _) in fits.items()}
    bands = {}
    bands[f"bagging ({s.ensemble} models)"] = torch.stack([predict(m, p.grid) for m in bagged(cfg, p, s)])
    bands[f"MC dropout ({s.mc_samples} samples)"] = mc_dropout(fits[f"dropout p={s.dropout:g}"][0], p.grid,
                                                               s.mc_samples)
    for name, preds in bands.items():
        curves[name] = preds.mean(0)

    truth = Problem.truth(p.grid).squeeze(1)
    summary = []
    for name, curve in curves.items():
        model, steps = fits.get(name, (None, s.steps))
        row = {"method": name, "steps": steps, "truth_mse": float(F.mse_loss(curve, truth))}
        if model is not None:
            row["train_mse"] = float(F.mse_loss(predict(model, p.x), p.y.squeeze(1)))
            row["val_mse"] = float(F.mse_loss(predict(model, p.x_val), p.y_val.squeeze(1)))
        summary.append(row)

    fig, axes = subplots(len(curves), cols=4, size=3.2, sharex=True, sharey=True)
    for ax, (name, curve) in zip(axes, curves.items()):
        ax.plot(p.grid, truth, color="0.6", lw=1, label="sin(2πx)")
        if name in bands:
            std = bands[name].std(0)
            ax.fill_between(p.grid.squeeze(1), curve - 2 * std, curve + 2 * std, color="C1", alpha=0.25,
                            label="mean ± 2 std")
        ax.plot(p.grid, curve, color="C1", lw=1.8, label="fit")
        ax.plot(p.x, p.y, "o", color="C0", ms=4, label="training points")
        ax.set_ylim(-2, 2)
        steps = fits[name][1] if name in fits else s.steps
        ax.set_title(name + (f" (step {steps})" if name == "early stopping" else ""), fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left")
    m = cfg.model
    fig.suptitle(f"{s.n_points} noisy points, MLP {m.depth}×{m.width} {m.activation}, "
                 f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g}, {s.steps} full-batch steps")
    fig.tight_layout()
    rows = []
    for i in range(s.grid):
        row = {"x": float(p.grid[i, 0]), "truth": float(truth[i])}
        row.update({name: float(c[i]) for name, c in curves.items()})
        row.update({f"{name} std": float(b.std(0)[i]) for name, b in bands.items()})
        rows.append(row)
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("fits", fig)
        out.table("curves", rows)
        out.table("summary", summary)
        out.table("points", p.rows())
    return {"status": "completed", "fits": len(curves)}
