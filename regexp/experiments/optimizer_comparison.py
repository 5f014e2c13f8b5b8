"""``+experiment=optimizer_comparison``: the same MLP on MNIST-1D trained with each optimizer.

Goodfellow et al. ch. 8 and Prince ch. 6 compare optimizers by their loss curves. Every
optimizer's config is composed from ``configs/optimizer/<name>.yaml`` (the one chosen on the
command line stands in for its own name, with its overrides), its learning rate optionally
replaced by ``extra.lr``; each optimizer × seed is one run folder
``optimizer=<name>/seed=<s>/`` trained by the framework's trainer.

Writes ``loss_curves.png`` (train and validation loss, validation accuracy per epoch,
averaged over seeds), ``results.csv`` (one row per run) and ``curves.csv`` (every epoch).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
from omegaconf import DictConfig

from regexp.experiments._figures import Outputs
from regexp.experiments._groups import selected_configs
from regexp.experiments._runs import curve_rows, mean_curve, mean_of, run_variants, select
from regexp.experiments._settings import require, settings
from regexp.tasks import register_task

LABELS = {"sgd": "sgd (minibatch)"}


@dataclass
class Settings:
    optimizers: List[str] = field(default_factory=lambda: [
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam"])
    lr: Dict[str, float] = field(default_factory=dict)  # optimizer -> lr; others keep their YAML's
    seeds: List[int] = field(default_factory=lambda: [0])


@register_task("optimizer_comparison")
def optimizer_comparison(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "optimizer_comparison")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    variants = {}
    for name, ocfg in selected_configs(cfg, "optimizer", s.optimizers, overrides, s.lr).items():
        require(ocfg.lr > 0, f"extra.lr.{name}", ocfg.lr, "a number > 0")
        vcfg = copy.deepcopy(cfg)
        vcfg.optimizer = ocfg
        variants[name] = vcfg
    rows = run_variants(variants, s.seeds, out_dir, label="optimizer")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("train_loss", "training loss", True), ("val_loss", "validation loss", True),
              ("val_acc", "validation accuracy", False)]
    for ax, (metric, title, log) in zip(axes, panels):
        for i, name in enumerate(variants):
            epochs, values = mean_curve(select(rows, optimizer=name), metric)
            lr = variants[name].optimizer.lr
            ax.plot(epochs, values, color=f"C{i}", label=f"{LABELS.get(name, name)} (η={lr:g})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.model.name} on {cfg.data.name}, batch {cfg.trainer.batch_size}, "
                 f"mean of {len(s.seeds)} seed(s)")
    fig.tight_layout()
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("loss_curves", fig)
        out.table("results", rows)
        out.table("curves", curve_rows(rows, ["optimizer", "seed"]))
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed,
            "test_error": {name: mean_of(select(rows, optimizer=name), "test_error") for name in variants}}
