"""``+experiment=implicit_regularization``: test error over learning rate × batch size with plain
SGD (Prince fig. 9.5), and full-batch gradient descent against SGD.

Prince ch. 9 explains that SGD with a larger learning rate or a smaller batch adds an
implicit penalty on the gradient's size and variance, so it tends to find solutions that
generalize better. Every learning rate × batch size × seed is one run folder below
``grid/`` trained by the framework's trainer (``optimizer=sgd``, the same epochs each); the
comparison trains ``trainer.batch_size=full`` and a small batch at one learning rate
below ``gd_vs_sgd/``.

Writes ``lr_batch.png`` (test error heatmap and curves), ``gd_vs_sgd.png`` (training loss
and test error against steps, and test error against training loss), ``results.csv``
(column ``part``) and ``curves.csv`` (with the optimizer step of each evaluation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._runs import curve_rows, history, mean_of, run_grid, select
from regexp.experiments._settings import require, settings
from regexp.tasks import register_task

LR, BS = "optimizer.lr", "trainer.batch_size"


@dataclass
class Settings:
    lrs: List[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    batch_sizes: List[int] = field(default_factory=lambda: [16, 64, 256])
    seeds: List[int] = field(default_factory=lambda: [0])
    # full-batch GD against SGD at one learning rate
    compare_lr: float = 0.1
    sgd_batch_size: int = 32
    sgd_epochs: int = 20
    gd_steps: int = 1000
    gd_eval_every: int = 10


def _grid_figure(rows: List[Dict], s: Settings, title: str):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    z = np.array([[mean_of(select(rows, **{LR: lr, BS: b}), "test_error") for b in s.batch_sizes]
                  for lr in s.lrs])
    im = axes[0].imshow(z, cmap="viridis_r", aspect="auto")
    for (r, c), v in np.ndenumerate(z):
        axes[0].text(c, r, "div." if math.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                     color="w" if not math.isnan(v) and v > np.nanmean(z) else "k")
    axes[0].set_xticks(range(len(s.batch_sizes)), s.batch_sizes)
    axes[0].set_yticks(range(len(s.lrs)), [f"{lr:g}" for lr in s.lrs])
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("learning rate")
    axes[0].set_title("test error")
    fig.colorbar(im, ax=axes[0])
    for j, b in enumerate(s.batch_sizes):
        axes[1].plot(s.lrs, z[:, j], "-o", label=f"batch {b}")
    for i, lr in enumerate(s.lrs):
        axes[2].plot(s.batch_sizes, z[i, :], "-o", label=f"lr {lr:g}")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("learning rate")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("batch size")
    for ax in axes[1:]:
        ax.set_ylabel("test error")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _compare_figure(rows: List[Dict], steps_per_epoch: Dict[str, int], title: str):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, row in enumerate(rows):
        h = history(row["run_dir"])
        steps = [r["epoch"] * steps_per_epoch[str(row[BS])] for r in h]
        label = "GD (full batch)" if row[BS] == "full" else f"SGD (batch {row[BS]})"
        label += f", seed {row['seed']}"
        train, test = [r["train_loss"] for r in h], [1 - r["test_acc"] for r in h]
        axes[0].plot(steps, train, color=f"C{i}", label=label)
        axes[1].plot(steps, test, color=f"C{i}", label=label)
        axes[2].plot(train, test, color=f"C{i}", label=label)
    axes[0].set_title("training loss")
    axes[1].set_title("test error")
    axes[2].set_title("test error at equal training loss")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps")
    axes[0].set_yscale("log")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("training loss")
    axes[2].invert_xaxis()  # training proceeds left to right
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@register_task("implicit_regularization")
def implicit_regularization(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "implicit_regularization")
    require(cfg.optimizer.name == "sgd", "optimizer.name", cfg.optimizer.name,
            "sgd (the implicit regularization of plain SGD is the subject)")
    for key in ("compare_lr", "sgd_batch_size", "sgd_epochs", "gd_steps", "gd_eval_every"):
        require(getattr(s, key) > 0, f"extra.{key}", getattr(s, key), "a number > 0")
    require(all(lr > 0 for lr in s.lrs), "extra.lrs", s.lrs, "numbers > 0")
    require(all(b >= 1 for b in s.batch_sizes), "extra.batch_sizes", s.batch_sizes, "integers >= 1")
    rows = [{"part": "grid", **r}
            for r in run_grid(cfg, {LR: s.lrs, BS: s.batch_sizes}, s.seeds, out_dir / "grid")]
    gd = run_grid(cfg, {LR: [s.compare_lr], BS: ["full"], "trainer.epochs": [s.gd_steps],
                        "trainer.eval_every": [s.gd_eval_every]}, s.seeds, out_dir / "gd_vs_sgd")
    sgd = run_grid(cfg, {LR: [s.compare_lr], BS: [s.sgd_batch_size], "trainer.epochs": [s.sgd_epochs]},
                   s.seeds, out_dir / "gd_vs_sgd")
    compared = gd + sgd
    rows += [{"part": "gd_vs_sgd", **r} for r in compared]

    n = len(load_data(cfg.data, cfg.seed).y_train)
    steps_per_epoch = {"full": 1, **{str(b): math.ceil(n / b) for b in [*s.batch_sizes, s.sgd_batch_size]}}
    curves = curve_rows(rows, ["part", LR, BS, "seed"])
    for c in curves:
        c["step"] = c["epoch"] * steps_per_epoch[str(c[BS])]
    where = f"{cfg.model.name} on {cfg.data.name} ({n} training examples), plain SGD"
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        grid_title = f"{where}, {cfg.trainer.epochs} epochs"
        out.figure("lr_batch", _grid_figure(select(rows, part="grid"), s, grid_title))
        out.figure("gd_vs_sgd", _compare_figure(compared, steps_per_epoch, f"{where}, lr {s.compare_lr:g}"))
        out.table("results", rows)
        out.table("curves", curves)
    failed = sum(r["status"] == "failed" for r in rows)  # a diverged point is a result, not a failure
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}
