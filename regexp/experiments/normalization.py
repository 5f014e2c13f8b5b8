"""``+experiment=normalization``: none / batch / layer / instance normalization on the CNN,
and how batch normalization depends on the batch size.

Bishop ch. 7 and Prince ch. 11 present batch norm against the layer and instance variants;
batch norm's statistics come from the mini-batch, so small batches make them noisy (and
the running averages used at evaluation poor), which the second part measures against the
same CNN without normalization. Each norm (× batch size) × seed is one run folder trained
by the framework's trainer: ``norms/<point>/`` and ``batch_size/<point>/``.

Writes ``norms.png`` (training loss and validation accuracy per epoch for each norm),
``batch_size.png`` (final test error against batch size, batch norm vs ``extra.baseline_norm``),
``results.csv`` (column ``part``) and ``curves.csv``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
from omegaconf import DictConfig

from regexp.experiments._figures import Outputs
from regexp.experiments._runs import curve_rows, mean_curve, mean_of, run_grid, select
from regexp.experiments._settings import require, require_choices, settings
from regexp.models import NORMS
from regexp.tasks import register_task


@dataclass
class Settings:
    norms: List[str] = field(default_factory=lambda: ["none", "batch", "layer", "instance"])
    batch_sizes: List[int] = field(default_factory=lambda: [4, 16, 64, 256])
    baseline_norm: str = "none"  # what batch norm is compared with across batch sizes
    seeds: List[int] = field(default_factory=lambda: [0])


def _norms_figure(rows: List[Dict], norms: List[str], title: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, norm in enumerate(norms):
        chosen = select(rows, **{"model.norm": norm})
        e, v = mean_curve(chosen, "train_loss")
        axes[0].plot(e, v, color=f"C{i}", label=f"{norm} (test error {mean_of(chosen, 'test_error'):.3f})")
        e, v = mean_curve(chosen, "val_acc")
        axes[1].plot(e, v, color=f"C{i}", label=norm)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    axes[1].set_title("validation accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8, title="model.norm", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _batch_figure(rows: List[Dict], norms: List[str], sizes: List[int], title: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, norm in enumerate(norms):
        test = [mean_of(select(rows, **{"model.norm": norm, "trainer.batch_size": b}), "test_error")
                for b in sizes]
        train = [mean_of(select(rows, **{"model.norm": norm, "trainer.batch_size": b}), "train_error")
                 for b in sizes]
        axes[0].plot(sizes, test, "-o", color=f"C{i}", label=f"norm={norm}")
        gap = [te - tr for te, tr in zip(test, train)]
        axes[1].plot(sizes, gap, "-o", color=f"C{i}", label=f"norm={norm}")
    axes[0].set_title("test error")
    axes[1].set_title("generalization gap (test − train error)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@register_task("normalization")
def normalization(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "normalization")
    valid = NORMS.get(cfg.model.name, ())
    require("batch" in valid, "model.name", cfg.model.name, "a model with batch normalization (cnn, mlp)")
    require_choices("extra.norms", s.norms, valid)
    require_choices("extra.baseline_norm", [s.baseline_norm], valid)
    for b in s.batch_sizes:
        require(b >= 1, "extra.batch_sizes", b, "integers >= 1")
    first = run_grid(cfg, {"model.norm": s.norms}, s.seeds, out_dir / "norms")
    rows = [{"part": "norms", **r} for r in first]
    compared = ["batch", s.baseline_norm] if s.baseline_norm != "batch" else ["batch"]
    if s.batch_sizes:
        part = run_grid(cfg, {"model.norm": compared, "trainer.batch_size": s.batch_sizes}, s.seeds,
                        out_dir / "batch_size")
        rows += [{"part": "batch_size", **r} for r in part]
    where = f"{cfg.model.name} on {cfg.data.name}, {cfg.trainer.epochs} epochs"
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("norms", _norms_figure(select(rows, part="norms"), s.norms,
                                          f"{where}, batch {cfg.trainer.batch_size}"))
        if s.batch_sizes:
            out.figure("batch_size", _batch_figure(select(rows, part="batch_size"), compared,
                                                   s.batch_sizes, where))
        out.table("results", rows)
        out.table("curves", curve_rows(rows, ["part", "model.norm", "trainer.batch_size", "seed"]))
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}
