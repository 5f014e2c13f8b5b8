"""Task ``sweep``: train the grid ``sweep.params`` × ``sweep.seeds`` in-process, then report it.

Each point is an ordinary run folder below the sweep folder (see :mod:`regexp.sweep`); the
report (:mod:`regexp.analysis.report`) then writes ``results.csv``, ``curve.csv``, the plot
named by ``extra.plot.name`` and the sweep-level TensorBoard run. The double-descent
experiments (``configs/experiment/double_descent*.yaml``) are this task with their own grids.

``sweep.x: epoch`` plots each run's history against the epoch instead of a swept key
(epoch-wise double descent); then ``sweep.params`` may be empty (one run per seed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

from regexp.errors import ConfigError
from regexp.sweep import grid, point_config, point_name, run_points
from regexp.tasks import register_task
from regexp.train.io import read_json

EPOCH = "epoch"  # sweep.x that plots each run's history (regexp.analysis.report.EPOCH)


def sweep_axis(cfg: DictConfig) -> str:
    """The x key: ``sweep.x``, or the first swept key; it must be swept (or be ``epoch``)."""
    params = list(cfg.sweep.params)
    x = cfg.sweep.x or (params[0] if params else None)
    if not params and x != EPOCH:
        raise ConfigError("sweep.params is empty: give at least one key and its values, e.g. "
                          "'sweep.params={model.width:[8,16,32]}' (or sweep.x=epoch for one run per seed)")
    if x != EPOCH and x not in params:
        raise ConfigError(f"sweep.x={x!r} is invalid: expected one of the swept keys "
                          f"({', '.join(params)}) or {EPOCH}")
    return x


def _check_values(params: Dict[str, Any]) -> None:
    for key, values in params.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.params.{key}={values!r} is invalid: expected a non-empty list of values")


def _runs(cfg: DictConfig, points: List[Dict[str, Any]], out_dir: Path, rows):
    """Each point's run as written by whichever engine trained it."""
    from regexp.analysis.collect import Run, train_size

    runs = []
    for point, row in zip(points, rows):
        run_dir = out_dir / point_name(point)
        metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() \
            else {"status": row.get("status", "failed"), "error": "no metrics.json"}
        runs.append(Run(run_dir, point, metrics, train_size(point_config(cfg, point).data)))
    return runs


@register_task("sweep")
def run_sweep(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict[str, Any]:
    # Imported here: every `python -m regexp.run` imports this module, only sweeps need matplotlib.
    from regexp.analysis.report import format_curve, plot_settings, report

    settings = plot_settings(cfg.extra)
    x = sweep_axis(cfg)
    params = OmegaConf.to_container(cfg.sweep.params, resolve=True)
    _check_values(params)
    seeds = list(cfg.sweep.seeds)
    if not seeds:
        raise ConfigError("sweep.seeds=[] is invalid: expected a non-empty list of seeds")
    points = grid(params, seeds)
    point_config(cfg, points[0])  # a misspelt key fails here, once, instead of at every point
    rows = run_points(cfg, points, out_dir)
    runs = _runs(cfg, points, out_dir, rows)
    curve = report(out_dir, runs, x, settings, keys=list(params) + ["seed"])
    print(format_curve(curve))
    failed = sum(r.status == "failed" for r in runs)
    return {"status": "failed" if failed else "completed", "epochs": cfg.trainer.epochs,
            "points": len(runs), "failed": failed}
