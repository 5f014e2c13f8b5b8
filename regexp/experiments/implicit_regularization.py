"""``+experiment=implicit_regularization``: test error over learning rate × batch size with plain
SGD at an equal lr × steps budget (Prince, UDL fig. 9.5), and the implicit term of gradient
descent made explicit (Barrett & Dherin 2021).

Prince §9.2: gradient descent with step α follows the gradient flow of the modified loss
L + (α/4)‖∇L‖², and SGD adds the minibatch gradients' variance (Smith et al. 2021), so a larger
learning rate or a smaller batch favours flatter solutions that tend to generalize better. The
book trains MNIST-1D (4000 train / 4000 test) for 6000/α iterations at every learning rate α,
"so each solution has the opportunity to move the same distance".

Grid: every learning rate × batch size × seed is one run folder below ``grid/`` trained by the
framework's trainer (``optimizer=sgd``), for ``extra.budget``/lr steps. The trainer counts
epochs, so a run trains round(steps / steps-per-epoch) epochs; ``results.csv`` records the
steps and lr × steps actually taken (the defaults make them exact).

Modified loss: full-batch gradient descent for the same time lr × steps = ``extra.gd_time``
at a large step ``gd_lr``, at a small step ``gd_small_lr``, and at the small step plus
``regularizer=gradient_norm_penalty`` with λ = (gd_lr − gd_small_lr)/4, which adds to the
small step's own implicit term (gd_small_lr/4) what the large step has more; below
``gd_penalty/``.

Writes ``lr_batch.png`` (test and train error heatmaps, test error against lr and batch),
``gd_penalty.png`` (training loss and test error against lr × steps, and each run's final
distance to the large-step weights), ``results.csv`` (column ``part``) and ``curves.csv``
(with the optimizer step and lr × step of each evaluation).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._runs import curve_rows, history, mean_of, run_grid, select
from regexp.experiments._settings import require, settings
from regexp.models import build_model
from regexp.tasks import register_task

LR, BS, EPOCHS, EVAL = "optimizer.lr", "trainer.batch_size", "trainer.epochs", "trainer.eval_every"
LAM = "regularizer.gradient_norm_penalty.lam"
GRID_EVALS = 10  # evaluations per grid run: the grid's figure needs only the final one
FITTED = 0.01  # train error up to which a cell counts as having fit the training set


@dataclass
class Settings:
    lrs: List[float] = field(default_factory=lambda: [0.1, 0.2, 0.4])
    batch_sizes: List[int] = field(default_factory=lambda: [16, 80, 400])
    seeds: List[int] = field(default_factory=lambda: [0])
    budget: float = 1000.0  # lr × steps of every grid run (the book: 6000)
    # full-batch gradient descent: large step, small step, small step + gradient-norm penalty
    gd_lr: float = 0.2
    gd_small_lr: float = 0.05
    gd_time: float = 10.0  # lr × steps of each of the three runs
    gd_evals: int = 10  # evaluations per run


def grid_steps(lr: float, batch: int, n: int, budget: float) -> Dict[str, int]:
    """Epochs, steps per epoch and steps of a grid run: budget/lr steps, rounded to whole epochs."""
    per_epoch = math.ceil(n / batch)
    epochs = max(1, round(budget / lr / per_epoch))
    return {"epochs": epochs, "steps_per_epoch": per_epoch, "steps": epochs * per_epoch}


def _heatmap(ax, fig, z: np.ndarray, s: Settings, title: str) -> None:
    im = ax.imshow(z, cmap="viridis_r", aspect="auto")
    for (r, c), v in np.ndenumerate(z):
        ax.text(c, r, "div." if math.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=9,
                color="w" if not math.isnan(v) and v > np.nanmean(z) else "k")
    ax.set_xticks(range(len(s.batch_sizes)), s.batch_sizes)
    ax.set_yticks(range(len(s.lrs)), [f"{lr:g}" for lr in s.lrs])
    ax.set_xlabel("batch size")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)


def _grid_figure(rows: List[Dict], s: Settings, title: str):
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))

    def table(key):
        return np.array([[mean_of(select(rows, **{LR: lr, BS: b}), key) for b in s.batch_sizes] for lr in s.lrs])

    test, train = table("test_error"), table("train_error")
    _heatmap(axes[0], fig, test, s, "test error")
    _heatmap(axes[1], fig, train, s, "train error (the same cells)")
    for ax, xs, lines, labels, name in (
            (axes[2], s.lrs, [(test[:, j], train[:, j]) for j in range(len(s.batch_sizes))],
             [f"batch {b}" for b in s.batch_sizes], "learning rate"),
            (axes[3], s.batch_sizes, [(test[i, :], train[i, :]) for i in range(len(s.lrs))],
             [f"lr {lr:g}" for lr in s.lrs], "batch size")):
        for k, ((te, tr), label) in enumerate(zip(lines, labels)):
            ax.plot(xs, te, "-", color=f"C{k}", label=label)
            fitted = tr <= FITTED
            ax.plot(np.array(xs)[fitted], te[fitted], "o", color=f"C{k}")
            ax.plot(np.array(xs)[~fitted], te[~fitted], "o", mfc="none", color=f"C{k}")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(name)
        ax.set_ylabel("test error")
        ax.legend(fontsize=8, title=f"open: train error > {FITTED:g}", title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _penalty_figure(rows: List[Dict], large_lr: float, title: str):
    """How far each small-step run is from the large-step run of its seed, over lr × steps."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    curves = {id(r): ([h["epoch"] * float(r[LR]) for h in history(r["run_dir"])], history(r["run_dir"]))
              for r in rows}  # full batch: one step per epoch
    for i, row in enumerate(rows):
        large = next((r for r in rows if r[LR] == large_lr and r["seed"] == row["seed"]), None)
        if row[LR] == large_lr or large is None:
            continue
        (t, h), (tl, hl) = curves[id(row)], curves[id(large)]
        for ax, key in zip(axes, ("train_loss", "test_loss")):
            ref = np.interp(t, tl, [r[key] for r in hl])  # the large step's curve at these times
            ax.plot(t, np.array([r[key] for r in h]) - ref, "-o", ms=3, color=f"C{i}",
                    label=f"{row['variant']}, seed {row['seed']}")
    moved = [r for r in rows if r["distance_to_large"] != ""]
    axes[2].bar(range(len(moved)), [r["distance_to_large"] for r in moved],
                color=[f"C{rows.index(r)}" for r in moved])
    axes[2].set_xticks(range(len(moved)), [f"{r['variant']}\nseed {r['seed']}" for r in moved], fontsize=7)
    axes[0].set_title(f"training loss − that of GD lr {large_lr:g}")
    axes[1].set_title(f"test loss − that of GD lr {large_lr:g}")
    axes[2].set_title(f"final ‖θ − θ(GD lr {large_lr:g})‖")
    for ax in axes[:2]:
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("lr × steps")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _final_state(cfg: DictConfig, row: Dict, data) -> Dict:
    """The final weights of a run, and ‖∇L‖² of the whole training set there."""
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(Path(row["run_dir"]) / "model.pt", weights_only=True))
    x, y = data.split("train")
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return {"weights": torch.cat([p.detach().flatten() for p in params]),
            "grad_norm_sq": sum(g.pow(2).sum() for g in grads).item()}


def _gd_penalty(cfg: DictConfig, s: Settings, out_dir: Path, data) -> List[Dict]:
    """Large-step, small-step and small-step + penalty gradient descent, with their final
    ‖∇L‖² and distance to the large-step weights (same seed)."""
    lam = round((s.gd_lr - s.gd_small_lr) / 4, 12)  # 0.2 - 0.05 is not 0.15 in binary
    penalized = copy.deepcopy(cfg)
    penalized.regularizer = {**cfg.regularizer, "gradient_norm_penalty": {"lam": lam, "mode": "full",
                                                                          "micro_batches": 1}}
    rows = []
    for name, c, lr, extra in [(f"GD lr {s.gd_lr:g}", cfg, s.gd_lr, {}),
                               (f"GD lr {s.gd_small_lr:g}", cfg, s.gd_small_lr, {}),
                               (f"GD lr {s.gd_small_lr:g} + λ‖∇L‖², λ={lam:g}", penalized, s.gd_small_lr,
                                {LAM: [lam]})]:
        steps = max(1, round(s.gd_time / lr))
        point = {LR: [lr], BS: ["full"], EPOCHS: [steps], EVAL: [max(1, steps // s.gd_evals)], **extra}
        for r in run_grid(c, point, s.seeds, out_dir / "gd_penalty"):
            rows.append({"part": "gd_penalty", "variant": name, "steps": steps, "lr_x_steps": lr * steps, **r})
    large = {}
    for r in rows:
        done = r["status"] == "completed"
        state = _final_state(cfg, r, data) if done else None
        r["grad_norm_sq"] = state["grad_norm_sq"] if done else ""
        if r[LR] == s.gd_lr and LAM not in r and done:
            large[r["seed"]] = state["weights"]
        r["distance_to_large"] = (float((state["weights"] - large[r["seed"]]).norm())
                                  if done and r["seed"] in large and r[LR] != s.gd_lr else "")
    return rows


@register_task("implicit_regularization")
def implicit_regularization(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "implicit_regularization")
    require(cfg.optimizer.name == "sgd", "optimizer.name", cfg.optimizer.name,
            "sgd (the implicit regularization of plain SGD is the subject)")
    for key in ("budget", "gd_lr", "gd_small_lr", "gd_time", "gd_evals"):
        require(getattr(s, key) > 0, f"extra.{key}", getattr(s, key), "a number > 0")
    require(s.gd_small_lr < s.gd_lr, "extra.gd_small_lr", s.gd_small_lr, f"less than extra.gd_lr={s.gd_lr:g}")
    require(all(lr > 0 for lr in s.lrs), "extra.lrs", s.lrs, "numbers > 0")
    require(all(b >= 1 for b in s.batch_sizes), "extra.batch_sizes", s.batch_sizes, "integers >= 1")
    data = load_data(cfg.data, cfg.seed)
    n = len(data.y_train)
    rows = []
    for lr in s.lrs:
        for b in s.batch_sizes:
            plan = grid_steps(lr, b, n, s.budget)
            point = {LR: [lr], BS: [b], EPOCHS: [plan["epochs"]], EVAL: [max(1, plan["epochs"] // GRID_EVALS)]}
            rows += [{"part": "grid", "steps": plan["steps"], "lr_x_steps": lr * plan["steps"], **r}
                     for r in run_grid(cfg, point, s.seeds, out_dir / "grid")]
    rows += _gd_penalty(cfg, s, out_dir, data)

    curves = curve_rows(rows, ["part", "variant", LR, BS, "seed"])
    for c in curves:
        c["step"] = c["epoch"] * (1 if c[BS] == "full" else math.ceil(n / int(c[BS])))
        c["lr_x_step"] = c["step"] * float(c[LR])
    where = f"{cfg.model.name} on {cfg.data.name} ({n} train / {len(data.y_test)} test), plain SGD"
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("lr_batch", _grid_figure(select(rows, part="grid"), s, f"{where}, lr × steps = {s.budget:g}"))
        title = f"{cfg.model.name} on {cfg.data.name}, full-batch gradient descent, lr × steps = {s.gd_time:g}"
        out.figure("gd_penalty", _penalty_figure(select(rows, part="gd_penalty"), s.gd_lr, title))
        out.table("results", rows)
        out.table("curves", curves)
    failed = sum(r["status"] == "failed" for r in rows)  # a diverged point is a result, not a failure
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}
