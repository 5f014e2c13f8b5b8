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
     (``tying/``).

Writes ``results.csv`` (one row per run: variant, λ, seed, train/val/test error),
``summary.csv`` (per variant and λ: mean and standard deviation over the seeds, and the λ that
the validation error picks) and ``tying.png`` (test error against λ, seeds' spread as error bars,
with plain transfer, scratch and the source model as lines). The summary is also printed.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf

from regexp.experiments._figures import Outputs
from regexp.experiments._runs import run_grid
from regexp.experiments._settings import require, settings
from regexp.regularizers.parameter_tying import ParameterTying
from regexp.regularizers.transfer import Transfer
from regexp.tasks import register_task

TASK = "parameter_tying"
LAM = "regularizer.parameter_tying.lam"


@dataclass
class Settings:
    lams: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    source_n_train: Optional[int] = None  # None: every training signal
    source_label_noise: float = 0.5
    source_epochs: int = 20


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
    tying = [r for r in out if r["variant"] == "tying"]
    for r in out:
        r["picked_by_val"] = bool(tying) and r is min(tying, key=lambda t: t["val_error_mean"])
    return out


def _figure(summary: List[Dict], title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tying = sorted((r for r in summary if r["variant"] == "tying"), key=lambda r: r["lam"])
    ax.errorbar([r["lam"] for r in tying], [r["test_error_mean"] for r in tying],
                yerr=[r["test_error_std"] for r in tying], marker="o", capsize=3,
                label="tying: transfer + λ‖w − w_source‖²")
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
    rows = [{k: v for k, v in r.items() if k != LAM} for r in rows]
    # the source model's own errors on the target task's splits are those of its run
    summary = summarize(rows)
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.table("results", rows)
        out.table("summary", summary)
        if any(r["variant"] == "tying" for r in summary):
            title = (f"{cfg.model.name} on {cfg.data.name}: target n_train={cfg.data.n_train}; source "
                     f"n_train={s.source_n_train or 'all'}, label noise {s.source_label_noise}; {len(s.seeds)} seeds")
            out.figure("tying", _figure(summary, title))
    print(table_text(summary))
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}


def table_text(summary: List[Dict]) -> str:
    lines = [f"{'variant':<9} {'lam':>7}  {'test error':>15}  {'val error':>15}  {'train error':>11}"]
    for r in summary:
        lam = f"{r['lam']:g}" if r["lam"] != "" else ""
        pick = "  <- picked by validation" if r["picked_by_val"] else ""
        lines.append(f"{r['variant']:<9} {lam:>7}  {r['test_error_mean']:.3f} ± {r['test_error_std']:.3f}  "
                     f"{r['val_error_mean']:.3f} ± {r['val_error_std']:.3f}  {r['train_error_mean']:>11.3f}{pick}")
    return "\n".join(lines)
