"""``+experiment=mnist1d_benchmark``: the MNIST-1D paper's benchmark table, paper vs ours.

Greydanus (2020), "Scaling down deep learning", reports the test accuracy of four models on
MNIST-1D (4000 training / 1000 test signals): logistic regression 32%, MLP 68%, CNN 94%,
GRU 91%. Each is trained here at the paper's settings (Adam, lr 1e-2, batch 100, 6000 steps =
150 epochs of 40 batches, no validation split) with the paper's architecture:

- logistic regression: ``model=mlp model.depth=0``, Linear(40, 10), 410 parameters;
- MLP: ``model=mlp`` (two hidden layers of 100 ReLU units), 15,210 parameters, as the paper's,
  which adds its second hidden layer's output to its input (a residual connection) where
  regexp's MLP does not;
- CNN: ``model=cnn_mnist1d`` (ConvBase), 5,210 parameters;
- GRU: ``model=gru`` (bidirectional, hidden 6, every step into Linear), 5,134 parameters.

Each model × seed is an ordinary run folder ``model=<name>/seed=<s>/`` trained by the
framework's trainer (:func:`regexp.experiments._runs.run_variants`); a re-launch trains only
what is missing. Writes ``runs.csv`` (one row per run), ``results.csv`` and ``results.md``
(one row per model: parameters, the paper's accuracy, ours as mean ± std over seeds, the
difference in percentage points, and whether it is within ``extra.tolerance`` points).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from regexp.experiments._groups import group_config
from regexp.experiments._runs import run_variants, select
from regexp.experiments._settings import require, settings
from regexp.experiments.regularizer_comparison import mean_std
from regexp.sweep import write_csv
from regexp.tasks import register_task

PAPER = "Greydanus (2020), Scaling down deep learning, MNIST-1D benchmark table"


@dataclass
class Model:
    option: str = "mlp"  # configs/model/<option>.yaml
    paper_acc: float = 0.0  # the test accuracy the paper reports, in [0, 1]
    keys: Dict[str, Any] = field(default_factory=dict)  # model keys set on top of the option
    seeds: Optional[List[int]] = None  # this model's own seeds; None: extra.seeds


@dataclass
class Settings:
    models: Dict[str, Model] = field(default_factory=lambda: {
        "logistic": Model("mlp", 0.32, {"depth": 0}),
        "mlp": Model("mlp", 0.68),
        "cnn": Model("cnn_mnist1d", 0.94),
        "gru": Model("gru", 0.91),
    })
    only: List[str] = field(default_factory=list)  # a subset of models, in this order
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    tolerance: float = 3.0  # percentage points from the paper counted as reproduced


def model_config(name: str, spec: Model) -> DictConfig:
    """``model=<option>`` with ``keys`` merged onto it (an unknown key or a wrong type named)."""
    from regexp.errors import ConfigError

    mcfg = group_config("model", spec.option)
    try:
        return OmegaConf.merge(mcfg, spec.keys)
    except Exception as e:  # OmegaConf names the key and the type it wanted
        raise ConfigError(f"extra.models.{name}.keys={spec.keys!r} is invalid for model={spec.option}: "
                          f"{str(e).splitlines()[0]}") from None


def summarize(rows: List[Dict[str, Any]], s: Settings, names: List[str], tolerance: float) -> List[Dict[str, Any]]:
    table = []
    for name in names:
        done = [r for r in select(rows, model=name) if r["status"] == "completed"]
        acc, std = mean_std([100.0 * (1.0 - float(r["test_error"])) for r in done])
        paper = 100.0 * s.models[name].paper_acc
        wall = [float(r["wall_s"]) for r in done if r.get("wall_s") != ""]
        table.append({
            "model": name, "option": s.models[name].option, "params": done[0]["params"] if done else "",
            "runs": len(done), "paper_test_acc": paper, "test_acc_mean": acc, "test_acc_std": std,
            "difference": acc - paper, "within_tolerance": bool(abs(acc - paper) <= tolerance),
            "wall_s_mean": sum(wall) / len(wall) if wall else float("nan"),
        })
    return table


def markdown(table: List[Dict[str, Any]], cfg: DictConfig, s: Settings) -> str:
    t = cfg.trainer
    steps = t.epochs * math.ceil(4000 / t.batch_size) if isinstance(t.batch_size, int) else t.epochs
    lines = [f"MNIST-1D test accuracy, paper vs ours ({PAPER}).",
             f"Ours: {cfg.optimizer.name} lr {cfg.optimizer.lr:g}, batch {t.batch_size}, {t.epochs} epochs "
             f"(~{steps} steps on 4000 training signals); ours is the mean ± std over the runs (seeds) "
             f"of each model; difference = ours − paper, in percentage points; within = "
             f"|difference| <= {s.tolerance:g}.",
             "",
             "| model | params | paper | ours (mean ± std) | difference | within ±%g | runs |" % s.tolerance,
             "|---|---:|---:|---:|---:|:---:|---:|"]
    for e in table:
        lines.append(f"| {e['model']} (`model={e['option']}`) | {e['params']} | {e['paper_test_acc']:.1f}% | "
                     f"{e['test_acc_mean']:.1f} ± {e['test_acc_std']:.1f}% | {e['difference']:+.1f} | "
                     f"{'yes' if e['within_tolerance'] else 'no'} | {e['runs']} |")
    lines += ["", "Differences of protocol (the paper's training script vs regexp's trainer):",
              "- batches: the paper takes consecutive slices of the training set in a fixed order; "
              "regexp reshuffles it every epoch.",
              "- MLP: the paper's adds its second hidden layer's output to that layer's input (a residual "
              "connection); regexp's MLP has the same layers and parameter count, without it.",
              "- the paper reports one run; ours is the mean over seeds (initialization and batch order; "
              "the data set is the published one in every run)."]
    return "\n".join(lines) + "\n"


@register_task("mnist1d_benchmark")
def mnist1d_benchmark(cfg: DictConfig, out_dir: Path, overrides, sweep: bool) -> Dict[str, Any]:
    s = settings(cfg, Settings, "mnist1d_benchmark")
    require(cfg.data.name == "mnist1d", "data.name", cfg.data.name, "mnist1d (the paper's benchmark)")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    require(s.tolerance >= 0, "extra.tolerance", s.tolerance, "a number >= 0 (percentage points)")
    unknown = [m for m in s.only if m not in s.models]
    require(not unknown, "extra.only", s.only, "names among extra.models: " + ", ".join(s.models))
    names = list(s.only) or list(s.models)
    require(bool(names), "extra.models", {}, "at least one model, e.g. {mlp: {option: mlp, paper_acc: 0.68}}")
    for name in names:
        spec = s.models[name]
        require(0.0 <= spec.paper_acc <= 1.0, f"extra.models.{name}.paper_acc", spec.paper_acc, "a number in [0, 1]")
        require(spec.seeds is None or len(spec.seeds) >= 1, f"extra.models.{name}.seeds", spec.seeds,
                "a non-empty list of integers, or null (extra.seeds)")
    variants = {}
    for name in names:
        vcfg = copy.deepcopy(cfg)
        vcfg.model = model_config(name, s.models[name])
        variants[name] = vcfg
    rows = []
    for name, vcfg in variants.items():  # each model with its own seeds (the GRU is the slow one)
        seeds = s.models[name].seeds if s.models[name].seeds is not None else s.seeds
        rows += run_variants({name: vcfg}, seeds, out_dir, label="model")
    write_csv(rows, out_dir / "runs.csv")
    table = summarize(rows, s, names, s.tolerance)
    write_csv(table, out_dir / "results.csv")
    md = markdown(table, cfg, s)
    (out_dir / "results.md").write_text(md)
    print(md)
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed,
            "test_acc": {e["model"]: e["test_acc_mean"] for e in table}}
