"""``+experiment=self_supervised``: self-supervised pretraining, then fine-tuning with few labels
(Prince, *Understanding Deep Learning* §9.3.7), against training from scratch.

For every seed, through the framework's trainer:

1. pretrain (``pretrain/seed=<s>/``): the model on every training signal with the pretext task
   ``regularizer.masked_reconstruction`` (a segment of each signal masked and predicted from the
   rest; the labels are never read) for ``extra.pretrain_epochs``. The validation and test
   signals are not seen;
2. for each label count n in ``extra.labels``: n labelled signals drawn from that same training
   pool (``data.n_train=n``, the seed's split), trained for ``trainer.epochs`` three ways:
   ``scratch`` (fresh weights), ``finetune`` (``transfer`` of the pretrained trunk, every layer
   trained, the classification head fresh) and ``linear_probe`` (the pretrained trunk frozen,
   only the head trained). The batch is ``min(trainer.batch_size, n)``.

The accuracy reported is the test accuracy after the last epoch: choosing an epoch on the
validation set would use more labels than the n being compared.

Writes ``results.csv`` (one row per run), ``summary.csv`` (per arm and n: mean and standard
deviation of the test accuracy over seeds, and for the two pretrained arms the mean and
standard deviation of their paired gain over ``scratch``; also printed), ``pretext.csv`` (each
pretraining's masked MSE on the test signals beside predicting each position's mean) and
``self_supervised.png`` (test accuracy against n per arm; the paired gain).
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
from regexp.experiments._runs import run_grid, run_listed
from regexp.experiments._settings import require, settings
from regexp.regularizers.transfer import Transfer
from regexp.tasks import register_task
from regexp.train.io import read_json

PRETEXT = "masked_reconstruction"
ARMS = ("scratch", "finetune", "linear_probe")


@dataclass
class Settings:
    pretrain_epochs: int = 50
    labels: List[int] = field(default_factory=lambda: [50, 100, 200, 500])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


def _mean_sd(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values) if values else float("nan"),
            "sd": statistics.stdev(values) if len(values) > 1 else float("nan")}


def summarize(rows: List[Dict[str, Any]], labels: List[int]) -> List[Dict[str, Any]]:
    acc = {(r["arm"], r["labels"], r["seed"]): r["test_acc"] for r in rows if r["status"] == "completed"}
    out = []
    for n in labels:
        for arm in ARMS:
            mine = [v for (a, m, _), v in acc.items() if a == arm and m == n]
            row = {"arm": arm, "labels": n, "runs": len(mine),
                   **{f"test_acc_{k}": v for k, v in _mean_sd(mine).items()}}
            if arm != "scratch":  # paired by seed: the same labelled examples, the same test set
                gain = [v - acc[("scratch", n, s)] for (a, m, s), v in acc.items()
                        if a == arm and m == n and ("scratch", n, s) in acc]
                row.update({f"gain_{k}": v for k, v in _mean_sd(gain).items()})
            out.append(row)
    return out


def checked_settings(cfg: DictConfig) -> Settings:
    """``extra`` as :class:`Settings`, and the run's config refused where the experiment cannot honour it."""
    s = settings(cfg, Settings, "self_supervised")
    for key, ok, valid in (
            ("extra.pretrain_epochs", s.pretrain_epochs >= 1, "an integer >= 1"),
            ("extra.seeds", len(s.seeds) >= 1, "a non-empty list of integers"),
            ("extra.labels", len(s.labels) >= 1 and all(n >= 1 for n in s.labels),
             "a non-empty list of integers >= 1 (labelled training signals)")):
        require(ok, key, getattr(s, key.split(".")[1]), valid)
    require(list(cfg.regularizer) == [PRETEXT], "regularizer", list(cfg.regularizer),
            f"[{PRETEXT}] (the pretext task; the fine-tuning runs use transfer alone)")
    require(cfg.data.n_train is None, "data.n_train", cfg.data.n_train,
            "null: the pretraining uses every training signal, the fine-tuning extra.labels of them")
    return s


@register_task("self_supervised")
def self_supervised(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = checked_settings(cfg)

    pre = copy.deepcopy(cfg)
    pre.trainer.epochs = s.pretrain_epochs
    pre.extra = {}  # the runs never read it: a relaunch with other labels finds its pretraining done
    pre_rows = {r["seed"]: r for r in run_grid(pre, {}, s.seeds, out_dir / "pretrain")}

    down = copy.deepcopy(cfg)
    down.regularizer = {}
    down.extra = {}
    rows: List[Dict[str, Any]] = []

    def points(seed: int) -> List[Dict[str, Any]]:
        bs = cfg.trainer.batch_size
        return [{"data.n_train": n, "trainer.batch_size": n if bs == "full" else min(int(bs), n), "seed": seed}
                for n in s.labels]

    def add(arm: str, trained: List[Dict[str, Any]]) -> None:
        for r in trained:
            rows.append({"arm": arm, "labels": r["data.n_train"], "seed": r["seed"], "status": r["status"],
                         "test_acc": 1 - r["test_error"] if r["test_error"] != "" else "",
                         "train_acc": 1 - r["train_error"] if r["train_error"] != "" else "",
                         "run_dir": r["run_dir"]})

    add("scratch", run_listed(down, [p for seed in s.seeds for p in points(seed)], out_dir / "scratch"))
    pretext = []
    for seed in s.seeds:
        p = pre_rows[seed]
        if p["status"] != "completed":
            rows += [{"arm": arm, "labels": n, "seed": seed, "status": "not run (pretraining failed)",
                      "test_acc": "", "train_acc": "", "run_dir": ""} for arm in ARMS[1:] for n in s.labels]
            continue
        extra = read_json(Path(p["run_dir"]) / "metrics.json")["extra"]
        pretext.append({"seed": seed, "test_mse": extra[f"{PRETEXT}/test_mse"],
                        "test_mse_position_mean": extra[f"{PRETEXT}/test_mse_position_mean"],
                        "run_dir": p["run_dir"]})
        for arm, freeze in (("finetune", False), ("linear_probe", True)):
            acfg = copy.deepcopy(down)
            acfg.regularizer = {"transfer": OmegaConf.structured(Transfer.Config(run_dir=p["run_dir"], freeze=freeze))}
            add(arm, run_listed(acfg, points(seed), out_dir / arm))
    summary = summarize(rows, s.labels)

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(ARMS):
        mine = [r for r in summary if r["arm"] == arm]
        ax.errorbar([r["labels"] for r in mine], [r["test_acc_mean"] for r in mine],
                    yerr=[r["test_acc_sd"] for r in mine], color=f"C{i}", marker="o", capsize=3, label=arm)
        if arm != "scratch":
            gx.errorbar([r["labels"] for r in mine], [r["gain_mean"] for r in mine],
                        yerr=[r["gain_sd"] for r in mine], color=f"C{i}", marker="o", capsize=3, label=arm)
    ax.set(xscale="log", xlabel="labelled training signals", ylabel="test accuracy (mean ± sd over seeds)",
           title="fine-tuning a pretrained trunk against training from scratch")
    gx.axhline(0, color="0.5", lw=1)
    gx.set(xscale="log", xlabel="labelled training signals", ylabel="test accuracy − scratch's (same seed)",
           title="gain from pretraining (mean ± sd of the paired differences)")
    for a in (ax, gx):
        a.set_xticks(s.labels, [str(n) for n in s.labels])
        a.minorticks_off()
        a.legend(fontsize=8)
    fig.suptitle(f"{cfg.model.name} on {cfg.data.name}: pretext {PRETEXT} (segment "
                 f"{cfg.regularizer[PRETEXT].segment}) for {s.pretrain_epochs} epochs, then "
                 f"{cfg.trainer.epochs} epochs; {len(s.seeds)} seed(s)")
    fig.tight_layout()
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("self_supervised", fig)
        for name, table in (("results", rows), ("summary", summary), ("pretext", pretext)):
            out.table(name, table)
    for p in pretext:
        print(f"pretext seed {p['seed']}: masked test MSE {p['test_mse']:.4f} "
              f"(each position's training mean: {p['test_mse_position_mean']:.4f})")
    print(f"{'arm':<13} {'labels':>6}  {'test acc':>15}  {'gain over scratch':>18}")
    for r in summary:
        gain = f"{r['gain_mean']:+.3f} ± {r['gain_sd']:.3f}" if "gain_mean" in r else ""
        print(f"{r['arm']:<13} {r['labels']:>6}  {r['test_acc_mean']:.3f} ± {r['test_acc_sd']:.3f}  {gain:>18}")
    failed = sum(r["status"] != "completed" for r in rows) + sum(p["status"] != "completed" for p in pre_rows.values())
    return {"status": "completed" if not failed else "failed", "runs": len(rows) + len(pre_rows), "failed": failed}
