"""``+experiment=init_activation``: a deep MLP for every activation × initialization, ± batch norm.

Prince ch. 7, Bishop ch. 7 and Goodfellow §8.4 show that sigmoid with small random weights
makes the signal and the gradient vanish layer by layer, that Xavier initialization suits
tanh and He initialization suits ReLU, and that batch normalization rescues the bad pairs.
Glorot & Bengio (2010, fig. 6) show it with histograms of each hidden layer's activations:
with N(0, 1) weights a sigmoid layer's outputs pile up at 0 and 1 (saturation), with
N(0, 0.01²) they collapse onto 0.5, with Xavier's variance they keep their spread.

Every activation × init × norm × seed is one run folder trained by the framework's trainer;
``init=normal`` runs once per std in ``extra.init_stds``. The per-layer numbers and
histograms are measured on one training batch at initialization and after training
(``_layers.py``).

Writes ``histograms.png`` (per hidden layer, the histogram of its activations for every
activation × init, at init filled and after training outlined), ``accuracy.png``
(validation accuracy per epoch for each pair), ``gradients.png`` and ``activations.png``
(per-layer gradient norm and activation std), ``grid.png`` (final test accuracy of every
pair, one panel per norm), and ``results.csv``, ``curves.csv``, ``layers.csv``,
``histograms.csv`` (one row per run × layer × init/trained: the bin range and the counts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._layers import initial_model, layer_stats
from regexp.experiments._runs import curve_rows, mean_curve, mean_of, run_listed, select
from regexp.experiments._settings import require, require_choices, settings
from regexp.models import ACTIVATIONS, INITS, NORMS
from regexp.sweep import point_config
from regexp.tasks import register_task
from regexp.train.io import load_tensors

KEYS = ("model.activation", "model.init", "model.norm")
# The output range of the bounded activations: their histograms span it, and an output
# within SATURATION of either end counts as saturated (its slope is below 1% of the peak).
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
SATURATION = 0.01


@dataclass
class Settings:
    activations: List[str] = field(default_factory=lambda: ["sigmoid", "tanh", "relu"])
    inits: List[str] = field(default_factory=lambda: ["normal", "xavier", "he"])
    init_stds: List[float] = field(default_factory=lambda: [1.0, 0.01])  # init=normal: one run per std
    norms: List[str] = field(default_factory=lambda: ["none", "batch"])
    seeds: List[int] = field(default_factory=lambda: [0])
    probe_size: int = 512  # training examples in the batch the per-layer numbers are measured on
    bins: int = 41  # histogram bins per layer (odd: 0.5, where a collapsed sigmoid sits, is a bin centre)


def _label(init: str, std: Any = None) -> str:
    return f"normal({float(std):g})" if init == "normal" else init


def _row_label(row: Dict[str, Any]) -> str:
    return _label(row["model.init"], row.get("model.init_std"))


def _labels(s: Settings) -> List[str]:
    """The init columns of the figures: one per init, ``normal`` once per std."""
    return [_label(i, std) for i in s.inits for std in (s.init_stds if i == "normal" else [None])]


def _points(s: Settings) -> Iterator[Dict[str, Any]]:
    for act in s.activations:
        for init in s.inits:
            for std in (s.init_stds if init == "normal" else [None]):
                for norm in s.norms:
                    for seed in s.seeds:
                        std_key = {} if std is None else {"model.init_std": std}
                        yield {"model.activation": act, "model.init": init, **std_key, "model.norm": norm,
                               "seed": seed}


def _point(row: Dict[str, Any]) -> Dict[str, Any]:
    return {k: row[k] for k in (*KEYS, "model.init_std", "seed") if k in row}


def _case(row: Dict[str, Any]) -> Dict[str, Any]:
    """What identifies a run in the per-layer tables."""
    return {**{k: row[k] for k in KEYS}, "init_label": row["init_label"], "seed": row["seed"]}


def histogram_range(acts: List[torch.Tensor], activation: str) -> Tuple[float, float]:
    """The activation's range when it is bounded (so saturation shows at the ends), else the
    range of the values in ``acts`` (one layer at init and trained: both on the same bins)."""
    if activation in BOUNDS:
        return BOUNDS[activation]
    finite = torch.cat([a[torch.isfinite(a)] for a in acts])  # a diverged run counts only its finite values
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)  # every value equal: a dead layer


def histogram(a: torch.Tensor, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.histogram(a.flatten().double().numpy(), bins=bins, range=(lo, hi))[0]


def saturated_fraction(a: torch.Tensor, activation: str):
    """Fraction of the outputs within SATURATION of either end of a bounded activation's range."""
    if activation not in BOUNDS:
        return ""
    lo, hi = BOUNDS[activation]
    return float(((a <= lo + SATURATION) | (a >= hi - SATURATION)).double().mean())


def _layer_rows(cfg: DictConfig, rows: List[Dict], s: Settings) -> Tuple[List[Dict], List[Dict]]:
    """Per-layer stats and activation histograms of every run, at initialization and with its
    trained weights."""
    data = load_data(cfg.data, cfg.seed)
    x, y = data.x_train[:s.probe_size], data.y_train[:s.probe_size]
    layers, hists = [], []
    for row in rows:
        act = row["model.activation"]
        model = initial_model(point_config(cfg, _point(row)).model, row["seed"], data.input_shape,
                              data.num_classes)
        states = {"init": None}
        trained = Path(row["run_dir"]) / "model.pt"
        if trained.exists():
            states["trained"] = load_tensors(trained, "model file", "delete the sweep folder to retrain it")
        stats = {}
        for when, state in states.items():
            if state is not None:
                model.load_state_dict(state)
            stats[when] = layer_stats(model, x, y)
        for when, st in stats.items():
            for layer, g in enumerate(st["grad_norm"]):
                hidden = layer < len(st["acts"])  # the head has no activation site
                a = st["acts"][layer] if hidden else None
                layers.append({**_case(row), "when": when, "layer": layer + 1,
                               "act_std": st["act_std"][layer] if hidden else "", "grad_norm": g,
                               "saturated": saturated_fraction(a, act) if hidden else ""})
                if hidden:
                    lo, hi = histogram_range([t["acts"][layer] for t in stats.values()], act)
                    counts = histogram(a, lo, hi, s.bins)
                    hists.append({**_case(row), "when": when, "layer": layer + 1, "lo": lo, "hi": hi,
                                  **{f"count_{i}": int(c) for i, c in enumerate(counts)}})
    return layers, hists


def _histogram_figure(s: Settings, rows: List[Dict], hists: List[Dict]):
    """One row per activation × init, one column per hidden layer (Glorot & Bengio 2010, fig. 6)."""
    norm, seed = s.norms[0], s.seeds[0]
    cases = [(a, lab) for a in s.activations for lab in _labels(s)]
    depth = max(int(h["layer"]) for h in hists)
    fig, axes = plt.subplots(len(cases), depth, squeeze=False, figsize=(2.3 * depth, 1.5 * len(cases) + 0.5),
                             layout="constrained")
    clipped = False
    for r, (act, lab) in enumerate(cases):
        match = {"model.activation": act, "init_label": lab, "model.norm": norm, "seed": seed}
        run = select(rows, **match)
        acc = f"\ntest acc {1 - mean_of(run, 'test_error'):.2f}" if run else ""
        axes[r, 0].set_ylabel(f"{act}\n{lab}{acc}", fontsize=8)
        for c in range(depth):
            ax = axes[r, c]
            tallest_rest = first = 0.0
            for when, style in (("init", dict(histtype="stepfilled", color="C0", alpha=0.6)),
                                ("trained", dict(histtype="step", color="C3", lw=1))):
                h = select(hists, **match, when=when, layer=c + 1)
                if not h:
                    continue
                counts = np.array([h[0][f"count_{i}"] for i in range(s.bins)], dtype=float)
                frac = counts / counts.sum()
                edges = np.linspace(h[0]["lo"], h[0]["hi"], s.bins + 1)
                ax.hist(edges[:-1], edges, weights=frac, label=when, **style)
                tallest_rest = max(tallest_rest, frac[1:].max())
                if when == "init":
                    first = frac[0]
            # ReLU's exact zeros fill the first bin; it is clipped (its share written instead) so
            # that the spread of the other outputs stays visible
            if act not in BOUNDS and first > 2 * tallest_rest > 0:
                ax.set_ylim(0, 1.3 * tallest_rest)
                clipped = True
                ax.text(0.02, 0.97, f"↑ {first:.0%}", transform=ax.transAxes, va="top", fontsize=7)
            ax.set_yticks([])
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(f"hidden layer {c + 1}", fontsize=9)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"activation histograms on {s.probe_size} training signals (norm={norm}, seed {seed}): "
                 "at initialization (filled) and after training (outline)"
                 + ("\n↑ n%: the first bin, clipped, holds n% of the activations at initialization" if clipped else ""),
                 fontsize=10)
    return fig


def _per_pair_figure(s: Settings, draw, ylabel: str, logy: bool):
    labels = _labels(s)
    fig, axes = plt.subplots(len(s.activations), len(labels), squeeze=False, sharex=True,
                             figsize=(3.6 * len(labels), 2.8 * len(s.activations)))
    for i, act in enumerate(s.activations):
        for j, lab in enumerate(labels):
            ax = axes[i, j]
            draw(ax, act, lab)
            if logy:
                ax.set_yscale("log")
            ax.set_title(f"{act} / {lab}", fontsize=9)
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
    require("normal" not in s.inits or (s.init_stds and all(v > 0 for v in s.init_stds)), "extra.init_stds",
            s.init_stds, "a non-empty list of numbers > 0 (the stds init=normal runs with)")
    require(s.probe_size >= 2, "extra.probe_size", s.probe_size, "an integer >= 2")
    require(s.bins >= 2, "extra.bins", s.bins, "an integer >= 2")
    rows = run_listed(cfg, _points(s), out_dir)
    for row in rows:
        row["init_label"] = _row_label(row)
    layers, hists = _layer_rows(cfg, rows, s)
    labels = _labels(s)
    styles = {"none": "-", "batch": "--", "layer": ":"}

    def pair(act, lab, norm):
        return {"model.activation": act, "init_label": lab, "model.norm": norm}

    def acc(ax, act, lab):
        for norm in s.norms:
            e, v = mean_curve(select(rows, **pair(act, lab, norm)), "val_acc")
            ax.plot(e, v, styles[norm], color="C0", label=f"norm={norm}")
        ax.set_ylim(0, 1)

    def per_layer(metric):
        def draw(ax, act, lab):
            for c, when in enumerate(("init", "trained")):
                for norm in s.norms:
                    xs, v = _layer_mean(layers, metric, **pair(act, lab, norm), when=when)
                    ax.plot(xs, v, styles[norm], marker="o", ms=3, color=f"C{c}",
                            label=f"{when}, norm={norm}")
            ax.set_xlabel("layer (input → output)")
        return draw

    grid_fig, grid_axes = plt.subplots(1, len(s.norms), figsize=((1.0 * len(labels) + 1.6) * len(s.norms), 3.6),
                                       squeeze=False)
    for ax, norm in zip(grid_axes[0], s.norms):
        z = np.array([[mean_of(select(rows, **pair(a, lab, norm)), "test_error") for lab in labels]
                      for a in s.activations])
        ax.imshow(1 - z, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(1 - z):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_yticks(range(len(s.activations)), s.activations)
        ax.set_title(f"test accuracy, norm={norm}")
    grid_fig.suptitle(f"MLP depth {cfg.model.depth} × width {cfg.model.width}, {cfg.trainer.epochs} epochs")
    grid_fig.tight_layout()

    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("histograms", _histogram_figure(s, rows, hists))
        out.figure("accuracy", _per_pair_figure(s, acc, "validation accuracy", False))
        out.figure("gradients", _per_pair_figure(s, per_layer("grad_norm"), "‖∂L/∂W‖", True))
        out.figure("activations", _per_pair_figure(s, per_layer("act_std"), "activation std", True))
        out.figure("grid", grid_fig)
        out.table("results", rows)
        out.table("curves", curve_rows(rows, [*KEYS, "init_label", "seed"]))
        out.table("layers", layers)
        out.table("histograms", hists)
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}
