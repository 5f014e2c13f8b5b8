"""``+experiment=memorization``: a network fits random labels and random inputs perfectly, and
generalises not at all (Zhang, Bengio, Hardt, Recht & Vinyals 2017, fig. 1; the result Bishop
& Bishop, *Deep Learning* §9.3.2, builds on).

Each condition is one set of data keys, trained by the framework's trainer for every seed:

- ``true_labels``: the data as it is;
- ``random_labels``: every label drawn uniformly from the K classes, independently of the input.
  ``data.label_noise`` moves a chosen label to a *different* class, so Zhang et al.'s corruption
  level p (each label replaced with probability p by a uniform draw over all K classes) is
  ``label_noise = p·(K−1)/K``: 0.9 for K = 10 leaves every example's label uniform over the
  classes and independent of it;
- ``wrong_labels`` (``label_noise=1``): every label moved to another class. Not random: "not
  the true class" is information, and a model that learns it sits *below* chance on the test set;
- ``shuffled_pixels``, ``random_pixels``, ``gaussian``: ``data.random_inputs`` with true labels
  (regexp/data/random_inputs.py).

The corruption levels ``extra.corruption`` (Zhang's p) give fig. 1b (the epochs it takes to fit
the training set exactly, against p) and fig. 1c (the test error then, against p).

Writes ``results.csv`` (one row per run, with ``epochs_to_zero_train_error``: the first evaluated
epoch with every training example classified right, empty if none), ``summary.csv`` (mean and
standard deviation over the seeds per condition and level; also printed), ``curves.csv`` and
``memorization.png`` (a: training loss per epoch; b: epochs to zero training error against p;
c: test error against p, with chance at (K−1)/K).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib.pyplot as plt
from omegaconf import DictConfig

from regexp.experiments._figures import Outputs
from regexp.experiments._runs import curve_rows, history, mean_curve, run_listed
from regexp.experiments._settings import require, require_choices, settings
from regexp.tasks import register_task

# MNIST-1D, MNIST, Fashion-MNIST and CIFAR-10 (every data set regexp has) have 10 classes.
CLASSES = 10
NOISE, INPUTS = "data.label_noise", "data.random_inputs"
CONDITIONS: Dict[str, Dict[str, Any]] = {
    "true_labels": {NOISE: 0.0, INPUTS: "none"},
    "random_labels": {NOISE: round((CLASSES - 1) / CLASSES, 6), INPUTS: "none"},
    "wrong_labels": {NOISE: 1.0, INPUTS: "none"},
    "shuffled_pixels": {NOISE: 0.0, INPUTS: "shuffled_pixels"},
    "random_pixels": {NOISE: 0.0, INPUTS: "random_pixels"},
    "gaussian": {NOISE: 0.0, INPUTS: "gaussian"},
}


@dataclass
class Settings:
    conditions: List[str] = field(default_factory=lambda: list(CONDITIONS))
    corruption: List[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


def label_noise_for(p: float) -> float:
    """Zhang et al.'s corruption level p as ``data.label_noise`` (which always changes the class)."""
    return round(p * (CLASSES - 1) / CLASSES, 6)


def epochs_to_fit(run_dir: str) -> Optional[int]:
    """The first evaluated epoch at which the training error is exactly 0 (None: never)."""
    return next((h["epoch"] for h in history(run_dir) if h.get("train_acc") == 1.0), None)


def _stats(values: List[float]) -> str:
    if not values:
        return "never"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


def summarize(rows: List[Dict[str, Any]], groups: List[str]) -> List[Dict[str, Any]]:
    """Per (group, p): mean and sample standard deviation over seeds; epochs only over the runs
    that reached zero training error, and how many did."""
    out = []
    for g in groups:
        mine = [r for r in rows if r["group"] == g and r["status"] == "completed"]
        fit = [float(r["epochs_to_zero_train_error"]) for r in mine if r["epochs_to_zero_train_error"] != ""]
        out.append({"group": g, "seeds": len(mine), "reached_zero_train_error": len(fit),
                    "epochs_to_zero_train_error": _stats(fit),
                    "final_train_error": _stats([r["train_error"] for r in mine]),
                    "test_error": _stats([r["test_error"] for r in mine])})
    return out


@register_task("memorization")
def memorization(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "memorization")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    require_choices("extra.conditions", s.conditions, CONDITIONS)
    for p in s.corruption:
        require(0.0 <= p <= 1.0, "extra.corruption", p, "numbers in [0, 1] (Zhang et al.'s label corruption level)")
    require(cfg.data.label_noise == 0 and cfg.data.random_inputs == "none", "data",
            f"label_noise={cfg.data.label_noise}, random_inputs={cfg.data.random_inputs}",
            "label_noise=0 and random_inputs=none: the experiment sets both per condition")
    groups: Dict[str, Dict[str, Any]] = {c: CONDITIONS[c] for c in s.conditions}
    groups.update({f"corruption={p:g}": {NOISE: label_noise_for(p), INPUTS: "none"} for p in s.corruption})
    points, seen = [], set()
    for keys in groups.values():
        for seed in s.seeds:
            point = {**keys, "seed": seed}
            if tuple(point.items()) not in seen:  # p=0 is true_labels, p=1 random_labels: trained once
                seen.add(tuple(point.items()))
                points.append(point)
    trained = {tuple((k, r[k]) for k in (NOISE, INPUTS, "seed")): r for r in run_listed(cfg, points, out_dir)}
    rows = []
    for g, keys in groups.items():
        for seed in s.seeds:
            r = trained[(*keys.items(), ("seed", seed))]
            fit = epochs_to_fit(r["run_dir"]) if r["status"] == "completed" else None
            rows.append({"group": g, **r, "epochs_to_zero_train_error": "" if fit is None else fit})
    summary = summarize(rows, list(groups))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, c in enumerate(s.conditions):
        epochs, loss = mean_curve([r for r in rows if r["group"] == c], "train_loss")
        axes[0].plot(epochs, loss, color=f"C{i}", label=c)
    axes[0].set(xlabel="epoch", ylabel="training loss (mean over seeds)", yscale="log",
                title="(a) fitting true labels, random labels, random inputs")
    axes[0].legend(fontsize=8)
    for ax, key, title in ((axes[1], "epochs_to_zero_train_error", "(b) epochs to zero training error"),
                           (axes[2], "test_error", "(c) test error once fitted")):
        for p in s.corruption:
            vals = [float(r[key]) for r in rows if r["group"] == f"corruption={p:g}" and r[key] != ""]
            ax.scatter([p] * len(vals), vals, color="C0", s=14, alpha=0.6)
            if vals:
                ax.errorbar(p, statistics.mean(vals), yerr=statistics.stdev(vals) if len(vals) > 1 else 0,
                            color="k", marker="_", ms=14, capsize=3)
        ax.set(xlabel="label corruption p (each label uniform over all classes with prob. p)", title=title)
    axes[2].axhline((CLASSES - 1) / CLASSES, color="0.5", ls="--", lw=1, label="chance")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{cfg.model.name} (width {cfg.model.get('width', '-')}) on {cfg.data.name}, "
                 f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g}, {len(s.seeds)} seed(s): points are runs, bars mean ± sd")
    fig.tight_layout()
    tables = {"results": rows, "summary": summary, "curves": curve_rows(rows, ["group", "seed"])}
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("memorization", fig)
        for name, table in tables.items():
            out.table(name, table)
    print(f"{'group':<18} {'fitted':>6}  {'epochs to 0 train err':>22}  {'final train err':>16}  {'test err':>16}")
    for r in summary:
        print(f"{r['group']:<18} {r['reached_zero_train_error']:>2}/{r['seeds']:<3}  {r['epochs_to_zero_train_error']:>22}"
              f"  {r['final_train_error']:>16}  {r['test_error']:>16}")
    failed = sum(r["status"] != "completed" for r in trained.values())
    return {"status": "completed" if not failed else "failed", "runs": len(trained), "failed": failed}
