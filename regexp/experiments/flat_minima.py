"""``+experiment=flat_minima``: batch size and learning rate against the curvature of the minimum
SGD finds and its test error (Keskar et al. 2017), and SGD against SAM on the same model.

Keskar et al. (2017) report that large-batch training converges to *sharp* minima (large
Hessian eigenvalues) that generalize worse than the flat minima small batches find; Prince
§9.2 explains the flat-minimum preference of SGD by its noise, whose scale grows with lr/batch
(Jastrzębski et al. 2017). SAM (Foret et al. 2021) asks for flatness explicitly: each step
descends the worst loss within a ρ-ball.

Grid: every learning rate × batch size × seed is one run folder below ``grid/`` trained with
plain SGD for the same number of steps ``extra.steps`` (the trainer counts epochs, so a run
trains round(steps / steps-per-epoch) epochs; ``results.csv`` records the steps taken). At the
end of every run the ``hessian`` probe (``probe=[hessian]``, on ``probe.batch_size`` training
examples) measures the top Hessian eigenvalue (Lanczos) and the trace (Hutchinson); the
sharpness probe, when chosen too, adds its columns. SAM (``optimizer=sam`` with an SGD base,
``extra.sam_rho``) trains the cell ``extra.sam_lr`` × ``extra.sam_batch_size`` below ``sam/``
beside the SGD runs of that cell.

Writes ``flat_minima.png`` (test error, top eigenvalue and trace against batch size per lr,
and test error against top eigenvalue for every run), ``sgd_vs_sam.png``, ``margins.png`` (the
distribution of training-set margins, correct-class logit minus the largest other, of the
smallest- and largest-batch runs at the SAM lr, of SAM's SGD twin and of SAM), ``results.csv`` (one row per run, column
``part``) and ``summary.csv`` (mean and sample std over seeds per cell).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs, subplots
from regexp.experiments._groups import group_config
from regexp.experiments._runs import run_grid
from regexp.experiments._settings import require, settings
from regexp.models import build_model
from regexp.probes.runner import active
from regexp.probes.sharpness import margins
from regexp.tasks import register_task

LR, BS, EPOCHS, EVAL = "optimizer.lr", "trainer.batch_size", "trainer.epochs", "trainer.eval_every"
TOP, TRACE = "probes.hessian/top1", "probes.hessian/trace"
COLUMNS = ("test_error", "train_error", "test_loss", "train_loss", TOP, TRACE)
EVALS = 5  # evaluations per run: the figures need only the final one


@dataclass
class Settings:
    lrs: List[float] = field(default_factory=lambda: [0.1, 0.3])
    batch_sizes: List[int] = field(default_factory=lambda: [16, 128, 512])
    steps: int = 3000  # SGD steps of every run, whatever its batch size
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    sam_lr: float = 0.3
    sam_batch_size: int = 128
    sam_rho: float = 0.05  # Foret et al.'s default with an SGD base


def plan(batch: int, n: int, steps: int) -> Dict[str, int]:
    """Epochs and steps of a run of ``steps`` SGD steps on ``n`` examples: rounded to whole epochs."""
    per_epoch = math.ceil(n / batch)
    epochs = max(1, round(steps / per_epoch))
    return {"epochs": epochs, "steps_per_epoch": per_epoch, "steps": epochs * per_epoch}


def _point(lr: float, batch: int, n: int, steps: int) -> Dict[str, list]:
    p = plan(batch, n, steps)
    return {LR: [lr], BS: [batch], EPOCHS: [p["epochs"]], EVAL: [max(1, p["epochs"] // EVALS)]}


def _mean_std(values: Sequence[float]):
    vals = [float(v) for v in values if v not in ("", None) and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def summarize(rows: Sequence[Dict]) -> List[Dict]:
    """Mean and sample std over the completed seeds of each (part, optimizer, lr, batch)."""
    cells: Dict[tuple, List[Dict]] = {}
    for r in rows:
        if r.get("status") == "completed":
            cells.setdefault((r["part"], r["optimizer"], r[LR], r[BS]), []).append(r)
    out = []
    for (part, opt, lr, b), rs in cells.items():
        row = {"part": part, "optimizer": opt, LR: lr, BS: b, "steps": rs[0]["steps"], "seeds": len(rs)}
        for c in COLUMNS:
            row[f"{c}_mean"], row[f"{c}_std"] = _mean_std([r.get(c, "") for r in rs])
        out.append(row)
    return out


def _cell(summary: Sequence[Dict], part: str, lr: float, b: int) -> Dict:
    found = [s for s in summary if s["part"] == part and s[LR] == lr and s[BS] == b]
    return found[0] if found else {}


def _grid_figure(summary: List[Dict], rows: List[Dict], s: Settings, title: str):
    fig, axes = subplots(4, cols=4, size=4.2)
    for ax, (col, name) in zip(axes[:3], (("test_error", "test error"), (TOP, "top Hessian eigenvalue λ₁"),
                                          (TRACE, "Hessian trace"))):
        for k, lr in enumerate(s.lrs):
            cells = [_cell(summary, "grid", lr, b) for b in s.batch_sizes]
            m = np.array([c.get(f"{col}_mean", np.nan) for c in cells])
            sd = np.array([c.get(f"{col}_std", np.nan) for c in cells])
            ax.errorbar(s.batch_sizes, m, yerr=sd, marker="o", capsize=3, color=f"C{k}", label=f"SGD lr {lr:g}")
        sam = [r for r in summary if r["part"] == "sam"]
        for c in sam:
            ax.errorbar([c[BS]], [c[f"{col}_mean"]], yerr=[c[f"{col}_std"]], marker="*", ms=12, capsize=3,
                        color="k", linestyle="none", label=f"SAM lr {c[LR]:g}, ρ={s.sam_rho:g}")
        ax.set_xscale("log")
        ax.set_xticks(s.batch_sizes, [str(b) for b in s.batch_sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_title(f"{name} (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[3]
    done = [r for r in rows if r["status"] == "completed" and r.get(TOP, "") != ""]
    for r in done:
        sam = r["part"] == "sam"
        k = s.lrs.index(r[LR]) if r[LR] in s.lrs else 0
        size = 20 + 60 * math.log2(r[BS]) / math.log2(max(s.batch_sizes + [2]))
        ax.scatter(r[TOP], r["test_error"], s=size, marker="*" if sam else "o",
                   color="k" if sam else f"C{k}", alpha=0.7)
    ax.set_xlabel("top Hessian eigenvalue λ₁")
    ax.set_ylabel("test error")
    ax.set_title("every run (marker size: batch; ★ SAM)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _sam_figure(rows: List[Dict], s: Settings, title: str):
    pair = [r for r in rows if r["status"] == "completed" and r[LR] == s.sam_lr and r[BS] == s.sam_batch_size]
    fig, axes = subplots(3, cols=3, size=3.6)
    for ax, (col, name) in zip(axes, (("test_error", "test error"), (TOP, "top eigenvalue λ₁"),
                                      (TRACE, "Hessian trace"))):
        for i, opt in enumerate(("sgd", "sam")):
            vals = [float(r[col]) for r in pair if r["optimizer"] == opt and r.get(col, "") != ""]
            if vals:
                ax.bar(i, np.mean(vals), color=f"C{i}", alpha=0.5)
                ax.plot([i] * len(vals), vals, "o", color=f"C{i}")
        ax.set_xticks([0, 1], ["SGD", f"SAM ρ={s.sam_rho:g}"])
        ax.set_title(f"{name} (bar: mean, dots: seeds)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _margins(cfg: DictConfig, row: Dict) -> np.ndarray:
    """Training-set margins of a finished run's final weights."""
    data = load_data(cfg.data, int(row["seed"]))
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(Path(row["run_dir"]) / "model.pt", weights_only=True))
    model.eval()
    x, y = data.split("train")
    with torch.no_grad():
        return margins(model, x, y, int(cfg.trainer.eval_batch_size or len(y))).numpy()


def _margin_figure(cfg: DictConfig, rows: List[Dict], s: Settings, title: str):
    """Margins pooled over seeds: the smallest and largest batch at SAM's lr, SAM's SGD twin, and SAM."""
    lr = s.sam_lr
    groups = [(f"SGD batch {b}, lr {lr:g}", [r for r in rows if r["part"] == "grid" and r[LR] == lr and r[BS] == b])
              for b in sorted({min(s.batch_sizes), s.sam_batch_size, max(s.batch_sizes)})]
    groups.append((f"SAM batch {s.sam_batch_size}, lr {s.sam_lr:g}, ρ={s.sam_rho:g}",
                   [r for r in rows if r["part"] == "sam"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, rs) in enumerate(groups):
        done = [r for r in rs if r["status"] == "completed"]
        if not done:
            continue
        m = np.concatenate([_margins(cfg, r) for r in done])
        ax.hist(m, bins=80, histtype="step", density=True, color=f"C{i}",
                label=f"{label}: median {np.median(m):.2f}, ≤0: {np.mean(m <= 0):.3f}")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("training-set margin (correct logit − largest other)")
    ax.set_ylabel("density (all seeds pooled)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _check(cfg: DictConfig, s: Settings) -> None:
    require(cfg.optimizer.name == "sgd", "optimizer.name", cfg.optimizer.name,
            "sgd (the grid is plain SGD; SAM is added by extra.sam_*)")
    require("hessian" in active(cfg.probe), "probe", list(active(cfg.probe)),
            "a list containing hessian, e.g. probe=[hessian] (the curvature is the subject)")
    require(s.steps >= 1, "extra.steps", s.steps, "an integer >= 1")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    require(len(s.lrs) >= 1 and all(lr > 0 for lr in s.lrs), "extra.lrs", s.lrs, "a non-empty list of numbers > 0")
    require(len(s.batch_sizes) >= 1 and all(b >= 1 for b in s.batch_sizes), "extra.batch_sizes", s.batch_sizes,
            "a non-empty list of integers >= 1")
    require(s.sam_lr > 0, "extra.sam_lr", s.sam_lr, "a number > 0")
    require(s.sam_batch_size >= 1, "extra.sam_batch_size", s.sam_batch_size, "an integer >= 1")
    require(s.sam_rho > 0, "extra.sam_rho", s.sam_rho, "a number > 0")


@register_task("flat_minima")
def flat_minima(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "flat_minima")
    _check(cfg, s)
    data = load_data(cfg.data, cfg.seed)
    n = len(data.y_train)
    rows: List[Dict] = []

    def add(part: str, opt: str, c: DictConfig, lr: float, b: int) -> None:
        steps = plan(b, n, s.steps)["steps"]
        for r in run_grid(c, _point(lr, b, n, s.steps), s.seeds, out_dir / part):
            rows.append({"part": part, "optimizer": opt, "steps": steps, **r})

    for lr in s.lrs:
        for b in s.batch_sizes:
            add("grid", "sgd", cfg, lr, b)
    if s.sam_lr not in s.lrs or s.sam_batch_size not in s.batch_sizes:  # SAM's SGD twin
        add("grid", "sgd", cfg, s.sam_lr, s.sam_batch_size)
    sam = copy.deepcopy(cfg)
    sam.optimizer = group_config("optimizer", "sam")
    sam.optimizer.base, sam.optimizer.rho = "sgd", s.sam_rho
    add("sam", "sam", sam, s.sam_lr, s.sam_batch_size)

    summary = summarize(rows)
    where = f"{cfg.model.name} on {cfg.data.name} ({n} train), {s.steps} steps each"
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("flat_minima", _grid_figure(summary, rows, s, f"Batch size, lr and curvature: {where}"))
        out.figure("sgd_vs_sam", _sam_figure(rows, s, f"SGD vs SAM at lr {s.sam_lr:g}, batch {s.sam_batch_size}"))
        out.figure("margins", _margin_figure(cfg, rows, s, f"Training-set margins: {where}"))
        out.table("results", rows)
        out.table("summary", summary)
    for c in summary:
        print(f"{c['part']:>4} {c['optimizer']:>3} lr {c[LR]:<5g} batch {c[BS]:>5}: "
              + "  ".join(f"{k.split('/')[-1]} {c[f'{k}_mean']:.4g}±{c[f'{k}_std']:.2g}"
                          for k in ("test_error", "train_error", TOP, TRACE)))
    failed = sum(r["status"] == "failed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed,
            "summary": summary}
