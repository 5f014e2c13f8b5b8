"""``+experiment=cross_validation``: k-fold cross-validation of one hyperparameter, then the
chosen value retrained on training + validation data and evaluated once on the test set.

Goodfellow ch. 5.3 and Bishop ch. 9 choose a regularization strength by k-fold
cross-validation: the training pool (the whole training set, validation split included) is
cut into k disjoint folds; each value is trained k times, each time validated on the fold
it did not see. The value with the lowest mean validation error is then trained on the
whole pool and tested once. Every value × fold × seed is one run folder
``fold=<i>/<key>=<value>,seed=<s>/`` trained by the framework's trainer; the final run is
``final/``.

Each fold is a data setting (``data.folds=k data.fold=i``, with ``data.split_seed`` set to
``extra.fold_seed`` so that every value and seed sees the same folds), so the fold runs are
ordinary runs that any engine can train.

Writes ``cv.png`` (mean validation error ± std over folds per value, the choice and its
test error), ``folds.csv`` (one row per fold run), ``summary.csv`` (one row per value) and
``final.csv``.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf

from regexp.experiments._figures import Outputs
from regexp.experiments._runs import mean_of, run_grid, select
from regexp.experiments._settings import require, settings
from regexp.tasks import register_task


@dataclass
class Settings:
    param: str = "regularizer.weight_decay.lam"
    values: List[Any] = field(default_factory=lambda: [0.0, 1e-4, 1e-3, 1e-2, 3e-2])
    folds: int = 5
    seeds: List[int] = field(default_factory=lambda: [0])
    fold_seed: int = 0  # which examples go into which fold


def _figure(summary: List[Dict], s: Settings, chosen: Any, final: Dict, title: str):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = list(range(len(summary)))
    means = [r["mean_val_error"] for r in summary]
    stds = [r["std_val_error"] for r in summary]
    ax.errorbar(xs, means, yerr=stds, fmt="-o", capsize=3, label=f"{s.folds}-fold validation error")
    i = [r["value"] for r in summary].index(chosen)
    ax.plot([i], [means[i]], "r*", ms=14, label=f"chosen: {chosen}")
    if final.get("test_error", "") != "":
        ax.plot([i], [final["test_error"]], "ks",
                label=f"retrained on all, test error {final['test_error']:.3f}")
    ax.set_xticks(xs, [str(r["value"]) for r in summary])
    ax.set_xlabel(s.param)
    ax.set_ylabel("error")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


@register_task("cross_validation")
def cross_validation(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "cross_validation")
    require(s.folds >= 2, "extra.folds", s.folds, "an integer >= 2")
    require(len(s.values) >= 1, "extra.values", s.values, "a non-empty list")
    require(OmegaConf.select(cfg, s.param, default="__missing__") != "__missing__", "extra.param", s.param,
            "a key of the config (add its regularizer, e.g. regularizer=[weight_decay])")
    rows: List[Dict] = []
    for fold in range(s.folds):
        runs = copy.deepcopy(cfg)
        runs.data.folds, runs.data.fold, runs.data.split_seed = s.folds, fold, s.fold_seed
        rows += [{"fold": fold, **r}
                 for r in run_grid(runs, {s.param: s.values}, s.seeds, out_dir / f"fold={fold}")]
    pool = copy.deepcopy(cfg)
    pool.data.val_fraction = 0.0  # the pool: training and validation examples together
    summary = []
    for v in s.values:
        errs = [float(r["val_error"]) for r in select(rows, **{s.param: v}) if r["status"] == "completed"]
        summary.append({"value": v, "runs": len(errs),
                        "mean_val_error": statistics.mean(errs) if errs else float("nan"),
                        "std_val_error": statistics.stdev(errs) if len(errs) > 1 else 0.0})
    ranked = [r for r in summary if r["runs"]]
    require(bool(ranked), "extra.values", s.values, "values for which at least one fold run completes")
    best = min(ranked, key=lambda r: r["mean_val_error"])
    for r in summary:
        r["chosen"] = r is best
    final_rows = run_grid(pool, {s.param: [best["value"]]}, s.seeds, out_dir / "final")
    final = {"value": best["value"], "test_error": mean_of(final_rows, "test_error"),
             "train_error": mean_of(final_rows, "train_error"), "runs": len(final_rows)}
    title = (f"{cfg.model.name} on {cfg.data.name}: {s.folds}-fold CV of {s.param}, "
             f"{cfg.trainer.epochs} epochs")
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("cv", _figure(summary, s, best["value"], final, title))
        out.table("folds", rows)
        out.table("summary", summary)
        out.table("final", [{**final, "seed": r["seed"], "status": r["status"], "run_dir": r["run_dir"]}
                            for r in final_rows])
    failed = sum(r["status"] != "completed" for r in rows + final_rows)
    return {"status": "completed" if not failed else "failed", "chosen": best["value"],
            "test_error": final["test_error"], "failed": failed}
