"""``python -m regexp.run +experiment=regularizer_comparison``: every regularizer on one problem.

Trains the same model (the experiment config: an MLP on MNIST-1D with 20% label noise) once per
*variant* and seed. A variant is a name and the regularizers it turns on with their settings
(``extra.variants``; ``none`` turns on nothing). Each variant's seeds are a sweep through
:func:`regexp.sweep.run_points`, so ``<out>/<variant>/seed=<s>/`` is an ordinary run folder
(metrics.json, TensorBoard events, model.pt) and a re-launch trains only what is missing.

Writes ``runs.csv`` (one row per run), ``results.csv`` and ``results.md`` (one row per variant:
test error mean ± std over seeds, train error, generalization gap = test error − train error;
the train error is measured on the noisy training labels), and a TensorBoard summary in
``<out>/summary`` (the table as text and a bar chart). ``tensorboard --logdir <out>`` overlays
every run's curves on one dashboard.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf

from regexp.errors import ConfigError
from regexp.sweep import grid, run_points, write_csv
from regexp.tasks import register_task

METRICS = ("test_error", "train_error", "gap")


def variant_regularizers(name: str, spec: Any) -> Dict[str, Any]:
    """``{regularizer: {key: value}}`` of one variant, each merged onto its schema."""
    from regexp.regularizers import REGULARIZERS

    spec = spec or {}
    if not isinstance(spec, (dict, DictConfig)):
        raise ConfigError(f"extra.variants.{name}={spec!r} is invalid: expected a mapping "
                          "regularizer name -> its settings, e.g. {dropout: {p: 0.3}}")
    out = {}
    for reg, settings in spec.items():
        if reg not in REGULARIZERS:
            raise ConfigError(f"extra.variants.{name}.{reg} is invalid: expected a regularizer, one of "
                              + ", ".join(sorted(REGULARIZERS)))
        schema = OmegaConf.structured(REGULARIZERS[reg].Config)
        try:
            out[reg] = OmegaConf.merge(schema, settings or {})
        except Exception as e:  # an unknown key or a wrong type, named by OmegaConf
            raise ConfigError(f"extra.variants.{name}.{reg} is invalid: {e}") from None
    return out


def variant_config(cfg: DictConfig, regs: Dict[str, Any]) -> DictConfig:
    base = copy.deepcopy(cfg)
    base.regularizer = {k: OmegaConf.to_container(v) for k, v in regs.items()}
    return base


def mean_std(values: List[float]) -> tuple:
    """Mean and sample standard deviation (0 for a single seed)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def summarize(rows: List[Dict[str, Any]], variants: List[str], label: str = "regularizer",
              metrics: Sequence[str] = METRICS) -> List[Dict[str, Any]]:
    """Per variant (``row[label]``): completed runs and mean/std over seeds of each metric."""
    table = []
    for v in variants:
        done = [r for r in rows if r[label] == v and r["status"] == "completed"]
        entry: Dict[str, Any] = {label: v, "runs": len(done)}
        for key in metrics:
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([float(r[key]) for r in done])
        table.append(entry)
    return table


def markdown(table: List[Dict[str, Any]], label: str = "regularizer", metrics: Sequence[str] = METRICS,
             headers: Sequence[str] = ("test error", "train error", "gap (test − train)")) -> str:
    lines = [f"| {label} | runs | " + " | ".join(headers) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for e in table:
        cells = [f"{e[f'{k}_mean']:.4f} ± {e[f'{k}_std']:.4f}" for k in metrics]
        lines.append(f"| {e[label]} | {e['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary_tensorboard(out_dir: Path, table: List[Dict[str, Any]], md: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(table)), 4))
    names = [e["regularizer"] for e in table]
    ax.bar(names, [e["test_error_mean"] for e in table], yerr=[e["test_error_std"] for e in table],
           capsize=3, color="tab:blue", label="test error")
    ax.plot(names, [e["train_error_mean"] for e in table], "o", color="tab:orange", label="train error")
    ax.set_ylabel("error (mean ± std over seeds)")
    ax.tick_params(axis="x", labelrotation=60)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=120)
    with SummaryWriter(str(out_dir / "summary")) as w:
        w.add_text("regularizer_comparison", md)
        w.add_figure("regularizer_comparison/error", fig)
        for i, e in enumerate(table):  # one step per variant, in table order, for a quick look
            w.add_scalar("regularizer_comparison/test_error", e["test_error_mean"], i)
    plt.close(fig)


@register_task("regularizer_comparison")
def regularizer_comparison(cfg: DictConfig, out_dir: Path, overrides, sweep: bool) -> Dict[str, Any]:
    variants = dict(cfg.extra.get("variants") or {})
    only = list(cfg.extra.get("only") or [])
    unknown = [v for v in only if v not in variants]
    if unknown:
        raise ConfigError(f"extra.only={only} is invalid: {unknown} not in extra.variants; expected "
                          "some of " + ", ".join(variants))
    names = only or list(variants)
    if not names:
        raise ConfigError("extra.variants is empty: expected at least one variant, e.g. {none: {}}")
    configs = {v: variant_config(cfg, variant_regularizers(v, variants[v])) for v in names}
    rows = []
    for v in names:
        for row in run_points(configs[v], grid({}, cfg.sweep.seeds), out_dir / v):
            row = {"regularizer": v, **row}
            if row["status"] == "completed":
                row["gap"] = row["test_error"] - row["train_error"]
            rows.append(row)
    write_csv(rows, out_dir / "runs.csv")
    table = summarize(rows, names)
    write_csv(table, out_dir / "results.csv")
    md = markdown(table)
    (out_dir / "results.md").write_text(md)
    write_summary_tensorboard(out_dir, table, md)
    print(md)
    failed = sum(r["status"] != "completed" for r in rows)
    return {"status": "completed" if not failed else "failed", "runs": len(rows), "failed": failed}
