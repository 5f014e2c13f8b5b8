"""``python -m regexp.run +experiment=sparse_representations``: what activity penalties do to the code.

Goodfellow et al., Deep Learning §7.10: a penalty on the hidden activations h (not on the
weights) asks for a *sparse representation*, most units off for any one input. The same ReLU
MLP is trained with no penalty and with each activity penalty of ``extra.variants`` (L1, the
Student-t log-prior, the KL penalty on each unit's mean rate), ``sweep.seeds`` each, every run
an ordinary run folder ``<out>/variant=<name>/seed=<s>/``.

Writes

- ``sparse_representations.png``: top, the last hidden layer's activations on ``extra.examples``
  test examples (rows, sorted by class) × its units (columns, sorted by mean activation; white
  = 0) of each variant's first seed; bottom, per variant (mean ± std over seeds): the fraction of
  hidden activations on the test set that are exactly 0 (``test_zero_frac`` of every run's
  metrics.json), the fraction of *dead* units (0 on every test example: a unit that never fires
  codes nothing, so it is shrinkage, not sparsity) and the test error;
- ``runs.csv`` (one row per run) and ``results.csv`` / ``results.md`` (per variant).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs, plt
from regexp.experiments._layers import initial_model
from regexp.experiments._runs import run_variants
from regexp.experiments._settings import require, settings
from regexp.experiments.regularizer_comparison import markdown, summarize, variant_config, variant_regularizers
from regexp.models import sites
from regexp.tasks import register_task
from regexp.train.io import load_tensors, read_json

METRICS = ("test_error", "test_zero_frac", "test_near_zero_frac", "dead_frac")
HEADERS = ("test error", "zero activations", "near-zero (< 1e-3)", "dead units")


@dataclass
class Settings:
    variants: Dict[str, Any] = field(default_factory=lambda: {"none": {}})
    examples: int = 60  # test examples (rows) in the heatmaps


@torch.no_grad()
def hidden_activations(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Every hidden layer's activations (N, units) on ``x``, in evaluation mode."""
    hidden = sites(model, "hidden")
    for s in hidden:
        s.record = True
    model.eval()
    model(x)
    return [s.last.flatten(1) for s in hidden]


def dead_fraction(acts: List[torch.Tensor]) -> float:
    """Fraction of hidden units that are exactly 0 on every example."""
    dead = sum(int((a == 0).all(0).sum()) for a in acts)
    return dead / sum(a.shape[1] for a in acts)


def heatmap_order(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows by class (stable), columns by mean activation, largest first."""
    return a[np.argsort(y, kind="stable")][:, np.argsort(-a.mean(0), kind="stable")]


def figure(table: List[Dict[str, Any]], maps: Dict[str, np.ndarray]):
    names = [e["variant"] for e in table]
    fig = plt.figure(figsize=(3.2 * max(len(names), 2), 6.4), layout="constrained")
    grid = fig.add_gridspec(2, len(names), height_ratios=[1.4, 1])
    for i, v in enumerate(names):
        ax = fig.add_subplot(grid[0, i])
        if v in maps:
            a = maps[v]
            ax.imshow(a, aspect="auto", cmap="Greys", vmin=0, vmax=max(float(a.max()), 1e-12),
                      interpolation="nearest")
        ax.set_title(v, fontsize=9)
        ax.set_xlabel("unit (by mean activation)")
        if i == 0:
            ax.set_ylabel("test example (by class)")
    ax = fig.add_subplot(grid[1, :])
    x = np.arange(len(names))
    for j, (key, label) in enumerate((("test_zero_frac", "activations exactly 0"),
                                      ("dead_frac", "dead units (0 on every example)"),
                                      ("test_error", "test error"))):
        ax.bar(x + (j - 1) * 0.27, [e[f"{key}_mean"] for e in table], 0.27,
               yerr=[e[f"{key}_std"] for e in table], capsize=3, label=label)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return fig


@register_task("sparse_representations")
def sparse_representations(cfg: DictConfig, out_dir: Path, overrides, sweep: bool) -> Dict[str, Any]:
    s = settings(cfg, Settings, "sparse_representations")
    require(bool(s.variants), "extra.variants", s.variants, "at least one variant, e.g. {none: {}}")
    require(s.examples >= 1, "extra.examples", s.examples, "an integer >= 1")
    require(cfg.model.name == "mlp" and cfg.model.depth >= 1, "model", f"{cfg.model.name}, depth "
            f"{cfg.model.get('depth')}", "an MLP with model.depth >= 1 (hidden units to look at)")
    names = list(s.variants)
    configs = {v: variant_config(cfg, variant_regularizers(v, s.variants[v])) for v in names}
    seeds = list(cfg.sweep.seeds)
    rows = run_variants(configs, seeds, out_dir)
    maps: Dict[str, np.ndarray] = {}
    datasets: Dict[int, Any] = {}
    for row in rows:
        if row["status"] != "completed":
            continue
        data = datasets.setdefault(row["seed"], load_data(cfg.data, row["seed"]))  # the run's own split
        x, y = data.split("test")
        final = read_json(Path(row["run_dir"]) / "metrics.json")["final"]
        row["test_zero_frac"], row["test_near_zero_frac"] = final["test_zero_frac"], final["test_near_zero_frac"]
        model = initial_model(cfg.model, row["seed"], data.input_shape, data.num_classes)
        model.load_state_dict(load_tensors(Path(row["run_dir"]) / "model.pt", "model file",
                                           "delete the run folder to retrain it"))
        acts = hidden_activations(model, x)
        row["dead_frac"] = dead_fraction(acts)
        if row["seed"] == seeds[0]:
            maps[row["variant"]] = heatmap_order(acts[-1][:s.examples].numpy(), y[:s.examples].numpy())
    table = summarize(rows, names, label="variant", metrics=METRICS)
    md = markdown(table, "variant", METRICS, HEADERS)
    with Outputs(out_dir) as out:
        out.table("runs", rows)
        out.table("results", table)
        out.figure("sparse_representations", figure(table, maps))
    (out_dir / "results.md").write_text(md)
    print(md)
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}
