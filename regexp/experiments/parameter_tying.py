"""``+experiment=parameter_tying``: parameter tying against plain transfer when the target task
has few examples (Goodfellow et al., Deep Learning §7.9; Li, Grandvalet & Davis 2018).

For each seed, through the framework's trainer:

1. source: the model on a related task with many examples (``extra.source_*``: by default all
   MNIST-1D training signals with half their labels replaced at random) (``source/``);
2. target: the task itself with ``data.n_train`` examples (clean labels), trained
   - from scratch (``scratch/``),
   - from the source weights with everything trainable (``transfer`` with ``freeze=false``),
     which is the λ = 0 point of
   - the same start plus the tying penalty λ‖w − w_source‖² for each λ in ``extra.lams``
     (``tying/``),
   - jointly with the source task, Goodfellow's setting (``joint/``): from scratch, beside a
     partner model trained in the same run on the source data, each step
     CE_target + CE_source + λ‖w − w_partner‖², for each λ in ``extra.joint_lams``; by default
     the run takes as many steps as the source run did, so the partner trains as long as the
     source model (``extra.joint_epochs`` sets it).

Writes ``results.csv`` (one row per run: variant, λ, seed, train/val/test error),
``summary.csv`` (per variant and λ: mean and standard deviation over the seeds, and per tying
variant the λ that the validation error picks), ``comparison.csv`` (each picked tying variant
against plain transfer and scratch: the per-seed difference of test error, mean ± std over the
seeds, which pair by seed: the same data split and source data) and ``tying.png`` (test error
against λ, seeds' spread as error bars, with plain transfer, scratch and the source model as
lines). The summary and the comparison are also printed.
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf

from regexp.experiments._figures import Outputs
from regexp.experiments._runs import run_grid
from regexp.experiments._settings import require, settings
from regexp.data import load_data
from regexp.regularizers.parameter_tying import ParameterTying
from regexp.regularizers.transfer import Transfer
from regexp.tasks import register_task

TASK = "parameter_tying"
TIED = ("tying", "joint")  # the variants with a λ; validation picks one λ of each
LAM = "regularizer.parameter_tying.lam"


@dataclass
class Settings:
    lams: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    source_n_train: Optional[int] = None  # None: every training signal
    source_label_noise: float = 0.5
    source_epochs: int = 20
    joint_lams: Optional[List[float]] = field(default_factory=lambda: [0.03, 0.1, 0.3])  # None: lams; []: none
    joint_epochs: Optional[int] = None  # None: as many steps as the source run's


def _spread(values: List[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: List[Dict]) -> List[Dict]:
    """Mean and standard deviation over seeds per (variant, λ), completed runs only; the tying
    row with the lowest mean validation error is marked ``picked_by_val``."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        if r["status"] == "completed":
            groups.setdefault((r["variant"], r["lam"]), []).append(r)
    out = []
    for (variant, lam), rs in groups.items():
        row = {"variant": variant, "lam": lam, "seeds": len(rs)}
        for s in ("train", "val", "test"):
            vals = [float(r[f"{s}_error"]) for r in rs]
            row[f"{s}_error_mean"], row[f"{s}_error_std"] = statistics.fmean(vals), _spread(vals)
        out.append(row)
    picked = [min(arm, key=lambda t: t["val_error_mean"]) for arm in
              ([r for r in out if r["variant"] == v] for v in TIED) if arm]
    for r in out:
        r["picked_by_val"] = any(r is p for p in picked)
    return out


def compare(rows: List[Dict], summary: List[Dict]) -> List[Dict]:
    """Each tying variant at the λ validation picked against plain transfer and scratch: the
    per-seed differences of test error (negative: tying better), mean and std over the seeds."""
    def errors(variant: str, lam) -> Dict[int, float]:
        return {int(r["seed"]): float(r["test_error"]) for r in rows
                if r["variant"] == variant and r["lam"] == lam and r["status"] == "completed"}

    out = []
    for p in (r for r in summary if r["picked_by_val"]):
        mine = errors(p["variant"], p["lam"])
        for other in ("transfer", "scratch"):
            theirs = errors(other, 0.0 if other == "transfer" else "")
            diffs = [mine[k] - theirs[k] for k in sorted(mine) if k in theirs]
            if diffs:
                out.append({"variant": p["variant"], "lam": p["lam"], "against": other, "seeds": len(diffs),
                            "test_error_diff_mean": statistics.fmean(diffs), "test_error_diff_std": _spread(diffs)})
    return out


def _figure(summary: List[Dict], title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {"tying": ("tab:blue", "tying: transfer + λ‖w − w_source‖²"),
              "joint": ("tab:purple", "joint: with a partner on the source data, λ‖w − w_partner‖²")}
    for variant, (color, label) in labels.items():
        arm = sorted((r for r in summary if r["variant"] == variant), key=lambda r: r["lam"])
        if arm:
            ax.errorbar([r["lam"] for r in arm], [r["test_error_mean"] for r in arm],
                        yerr=[r["test_error_std"] for r in arm], marker="o", capsize=3, color=color, label=label)
    styles = {"transfer": ("tab:orange", "--", "plain transfer (λ = 0)"), "scratch": ("tab:gray", ":", "from scratch"),
              "source": ("tab:green", "-.", "source model, not fine-tuned")}
    for r in summary:
        if r["variant"] in styles:
            color, ls, label = styles[r["variant"]]
            ax.axhline(r["test_error_mean"], color=color, ls=ls, label=f"{label}: {r['test_error_mean']:.3f}")
            ax.axhspan(r["test_error_mean"] - r["test_error_std"], r["test_error_mean"] + r["test_error_std"],
                       color=color, alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("λ (tying strength)")
    ax.set_ylabel("test error (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


@register_task(TASK)
def parameter_tying(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, TASK)
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    require(len(s.lams) >= 1 and all(v > 0 for v in s.lams), "extra.lams", s.lams, "a non-empty list of numbers > 0")
    require(s.source_epochs >= 1, "extra.source_epochs", s.source_epochs, "an integer >= 1")
    require(0 <= s.source_label_noise <= 1, "extra.source_label_noise", s.source_label_noise, "a number in [0, 1]")
    joint_lams = s.lams if s.joint_lams is None else s.joint_lams
    require(all(v > 0 for v in joint_lams), "extra.joint_lams", joint_lams, "a list of numbers > 0 (empty: no joint arm)")
    require(s.joint_epochs is None or s.joint_epochs >= 1, "extra.joint_epochs", s.joint_epochs,
            "an integer >= 1, or null (as many steps as the source run)")
    require(not cfg.regularizer, "regularizer", list(cfg.regularizer),
            "empty: the experiment sets transfer and parameter_tying itself")
    base = copy.deepcopy(cfg)
    base.extra = {}  # the runs do not read extra: a relaunch with more seeds or λ skips the runs it has
    src = copy.deepcopy(base)
    src.data.n_train, src.data.label_noise, src.trainer.epochs = s.source_n_train, s.source_label_noise, s.source_epochs
    sources = run_grid(src, {}, s.seeds, out_dir / "source")
    rows: List[Dict] = [{"variant": "source", "lam": "", "seed": seed, **r} for seed, r in zip(s.seeds, sources)]
    rows += [{"variant": "scratch", "lam": "", "seed": r["seed"], **r}
             for r in run_grid(base, {}, s.seeds, out_dir / "scratch")]
    for seed, source in zip(s.seeds, sources):
        if source["status"] != "completed":  # nothing to start from
            continue
        tied = copy.deepcopy(base)
        tied.regularizer = {
            "transfer": OmegaConf.structured(Transfer.Config(run_dir=source["run_dir"], freeze=False)),
            TASK: OmegaConf.structured(ParameterTying.Config(run_dir=source["run_dir"]))}
        for r in run_grid(tied, {LAM: [0.0, *s.lams]}, [seed], out_dir / "tying"):
            lam = float(r[LAM])
            rows.append({"variant": "tying" if lam else "transfer", "lam": lam, **r})
    if joint_lams:
        joint = copy.deepcopy(base)
        joint.trainer.epochs = s.joint_epochs or _epochs_like_source(src, base)
        joint.regularizer = {TASK: OmegaConf.structured(ParameterTying.Config(mode="joint", partner_data={
            "n_train": s.source_n_train, "label_noise": s.source_label_noise}))}
        rows += [{"variant": "joint", "lam": float(r[LAM]), **r}
                 for r in run_grid(joint, {LAM: list(joint_lams)}, s.seeds, out_dir / "joint")]
    rows = [{k: v for k, v in r.items() if k != LAM} for r in rows]
    # the source model's own errors on the target task's splits are those of its run
    summary = summarize(rows)
    comparison = compare(rows, summary)
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.table("results", rows)
        out.table("summary", summary)
        out.table("comparison", comparison)
        if any(r["variant"] in TIED for r in summary):
            title = (f"{cfg.model.name} on {cfg.data.name}: target n_train={cfg.data.n_train}; source "
                     f"n_train={s.source_n_train or 'all'}, label noise {s.source_label_noise}; {len(s.seeds)} seeds")
            out.figure("tying", _figure(summary, title))
    print(table_text(summary))
    print(comparison_text(comparison))
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}


def _epochs_like_source(src: DictConfig, target: DictConfig) -> int:
    """Target epochs whose steps number the source run's (at least), so that a joint run's
    partner takes as many steps on the source data as the source model did."""
    def steps_per_epoch(c: DictConfig) -> int:
        n = len(load_data(c.data, c.seed).y_train)
        return math.ceil(n / (n if c.trainer.batch_size == "full" else int(c.trainer.batch_size)))

    return math.ceil(src.trainer.epochs * steps_per_epoch(src) / steps_per_epoch(target))


def comparison_text(comparison: List[Dict]) -> str:
    lines = ["test error difference, paired by seed (negative: tying better)"]
    for r in comparison:
        beyond = abs(r["test_error_diff_mean"]) > r["test_error_diff_std"]
        lines.append(f"  {r['variant']} (λ {r['lam']:g}) − {r['against']}: {r['test_error_diff_mean']:+.3f} ± "
                     f"{r['test_error_diff_std']:.3f} over {r['seeds']} seeds"
                     + ("" if beyond else "  (within the seeds' spread)"))
    return "\n".join(lines)


def table_text(summary: List[Dict]) -> str:
    lines = [f"{'variant':<9} {'lam':>7}  {'test error':>15}  {'val error':>15}  {'train error':>11}"]
    for r in summary:
        lam = f"{r['lam']:g}" if r["lam"] != "" else ""
        pick = "  <- picked by validation" if r["picked_by_val"] else ""
        lines.append(f"{r['variant']:<9} {lam:>7}  {r['test_error_mean']:.3f} ± {r['test_error_std']:.3f}  "
                     f"{r['val_error_mean']:.3f} ± {r['val_error_std']:.3f}  {r['train_error_mean']:>11.3f}{pick}")
    return "\n".join(lines)
