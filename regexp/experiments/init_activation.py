"""``+experiment=init_activation``: a deep MLP for every activation × initialization, ± batch norm.

Prince ch. 7, Bishop ch. 7 and Goodfellow ch. 8 show that sigmoid with small random
weights makes the gradient vanish layer by layer, that Xavier initialization suits tanh and
He initialization suits ReLU, and that batch normalization rescues the bad pairs. Every
activation × init × norm × seed is one run folder trained by the framework's trainer.
The per-layer numbers are measured on one training batch at initialization and after
training (``_layers.py``).

Writes ``accuracy.png`` (validation accuracy per epoch for each pair), ``gradients.png``
and ``activations.png`` (per-layer gradient norm and activation std), ``grid.png`` (final
test accuracy of every pair, one panel per norm), and ``results.csv``, ``curves.csv``,
``layers.csv``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._layers import initial_model, layer_stats
from regexp.experiments._runs import curve_rows, mean_curve, mean_of, run_grid, select
from regexp.experiments._settings import require, require_choices, settings
from regexp.models import ACTIVATIONS, INITS, NORMS
from regexp.sweep import point_config
from regexp.tasks import register_task
from regexp.train.io import load_tensors

KEYS = ("model.activation", "model.init", "model.norm")


@dataclass
class Settings:
    activations: List[str] = field(default_factory=lambda: ["sigmoid", "tanh", "relu"])
    inits: List[str] = field(default_factory=lambda: ["normal", "xavier", "he"])
    norms: List[str] = field(default_factory=lambda: ["none", "batch"])
    seeds: List[int] = field(default_factory=lambda: [0])
    probe_size: int = 512  # training examples in the batch the per-layer numbers are measured on


def _init_label(cfg: DictConfig, init: str) -> str:
    return f"normal({cfg.model.init_std:g})" if init == "normal" else init


def _layer_rows(cfg: DictConfig, rows: List[Dict], probe_size: int) -> List[Dict]:
    """Per-layer stats of every run, at initialization and with its trained weights."""
    data = load_data(cfg.data, cfg.seed)
    x, y = data.x_train[:probe_size], data.y_train[:probe_size]
    out = []
    for row in rows:
        run_cfg = point_config(cfg, {k: row[k] for k in (*KEYS, "seed")})
        model = initial_model(run_cfg.model, row["seed"], data.input_shape, data.num_classes)
        states = {"init": None}
        trained = Path(row["run_dir"]) / "model.pt"
        if trained.exists():
            states["trained"] = load_tensors(trained, "model file", "delete the sweep folder to retrain it")
        for when, state in states.items():
            if state is not None:
                model.load_state_dict(state)
            stats = layer_stats(model, x, y)
            for layer, g in enumerate(stats["grad_norm"]):
                a = stats["act_std"][layer] if layer < len(stats["act_std"]) else ""  # head: no site
                out.append({**{k: row[k] for k in (*KEYS, "seed")}, "when": when, "layer": layer + 1,
                            "act_std": a, "grad_norm": g})
    return out


def _per_pair_figure(s: Settings, cfg: DictConfig, draw, ylabel: str, logy: bool):
    fig, axes = plt.subplots(len(s.activations), len(s.inits), squeeze=False, sharex=True,
                             figsize=(3.6 * len(s.inits), 2.8 * len(s.activations)))
    for i, act in enumerate(s.activations):
        for j, init in enumerate(s.inits):
            ax = axes[i, j]
            draw(ax, act, init)
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"{act} / {_init_label(cfg, init)}", fontsize=9)
            if j == 0:
                ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _layer_mean(layers: List[Dict], metric: str, **match) -> Tuple[List[int], List[float]]:
    chosen = [r for r in select(layers, **match) if r[metric] != ""]
    by_layer: Dict[int, List[float]] = {}
    for r in chosen:
        by_layer.setdefault(r["layer"], []).append(float(r[metric]))
    xs = sorted(by_layer)
    return xs, [float(np.mean(by_layer[k])) for k in xs]


@register_task("init_activation")
def init_activation(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "init_activation")
    require(cfg.model.name == "mlp", "model.name", cfg.model.name, "mlp (the experiment's deep MLP)")
    require(cfg.model.depth >= 1, "model.depth", cfg.model.depth,
            "an integer >= 1 (the figures are per hidden layer)")
    require_choices("extra.activations", s.activations, ACTIVATIONS)
    require_choices("extra.inits", s.inits, INITS)
    require_choices("extra.norms", s.norms, NORMS["mlp"])
    require(s.probe_size >= 2, "extra.probe_size", s.probe_size, "an integer >= 2")
    params = dict(zip(KEYS, (s.activations, s.inits, s.norms)))
    rows = run_grid(cfg, params, s.seeds, out_dir)
    layers = _layer_rows(cfg, rows, s.probe_size)
    styles = {"none": "-", "batch": "--", "layer": ":"}

    def acc(ax, act, init):
        for norm in s.norms:
            e, v = mean_curve(select(rows, **dict(zip(KEYS, (act, init, norm)))), "val_acc")
            ax.plot(e, v, styles[norm], color="C0", label=f"norm={norm}")
        ax.set_ylim(0, 1)

    def per_layer(metric):
        def draw(ax, act, init):
            for c, when in enumerate(("init", "trained")):
                for norm in s.norms:
                    xs, v = _layer_mean(layers, metric, **dict(zip(KEYS, (act, init, norm))), when=when)
                    ax.plot(xs, v, styles[norm], marker="o", ms=3, color=f"C{c}",
                            label=f"{when}, norm={norm}")
            ax.set_xlabel("layer (input → output)")
        return draw

    grid_fig, grid_axes = plt.subplots(1, len(s.norms), figsize=(4.2 * len(s.norms), 3.6), squeeze=False)
    for ax, norm in zip(grid_axes[0], s.norms):
        z = np.array([[mean_of(select(rows, **dict(zip(KEYS, (a, i, norm)))), "test_error")
                       for i in s.inits] for a in s.activations])
        ax.imshow(1 - z, vmin=0, vmax=1, cmap="viridis")
        for (r, c), v in np.ndenumerate(1 - z):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(s.inits)), [_init_label(cfg, i) for i in s.inits])
        ax.set_yticks(range(len(s.activations)), s.activations)
        ax.set_title(f"test accuracy, norm={norm}")
    grid_fig.suptitle(f"MLP depth {cfg.model.depth} × width {cfg.model.width}, {cfg.trainer.epochs} epochs")
    grid_fig.tight_layout()

    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("accuracy", _per_pair_figure(s, cfg, acc, "validation accuracy", False))
        out.figure("gradients", _per_pair_figure(s, cfg, per_layer("grad_norm"), "‖∂L/∂W‖", True))
        out.figure("activations", _per_pair_figure(s, cfg, per_layer("act_std"), "activation std", True))
        out.figure("grid", grid_fig)
        out.table("results", rows)
        out.table("curves", curve_rows(rows, [*KEYS, "seed"]))
        out.table("layers", layers)
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}
