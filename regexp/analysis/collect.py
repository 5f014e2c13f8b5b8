"""Find the runs below a sweep folder and recover, for each, the point it trained and its metrics.

The run folders are read by :mod:`regexp.results` (the one reader of run folders); this module
turns its table back into :class:`Run` s, the form the reports take. Works on both layouts a
sweep can have:

- an in-process sweep (``task=sweep``): ``<dir>/.hydra/`` holds the sweep's own config and
  overrides, and each point folder holds ``metrics.json`` whose ``overrides`` name the point;
- a Hydra multirun (``-m``, any launcher): each job folder holds ``.hydra/overrides.yaml``,
  ``.hydra/config.yaml`` and, unless the job died before writing it, ``metrics.json``.

A run's point is the union of the overrides of its folder and of every folder above it (up
to the sweep folder), the deeper one winning. A job folder without any ``metrics.json`` (killed,
out of memory) still counts, as a failed run, so a crash is never silently dropped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from regexp.errors import ConfigError

# Training-set sizes before the validation split (MNIST-1D: the published 4000 of 5000 signals).
TRAIN_SET_SIZES = {"mnist1d": 4000, "mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}
# Overrides that change how a job runs, never what it trains: they must not split a curve.
RUNTIME_KEYS = ("trainer.resume", "trainer.overwrite", "trainer.progress", "trainer.threads")


@dataclass
class Run:
    dir: Path
    point: Dict[str, Any]  # dotted key -> value, from the overrides
    metrics: Dict[str, Any]  # metrics.json, or {"status": "failed", "error": ...} when there is none
    n_train: Optional[int]  # training examples, for the interpolation threshold

    @property
    def status(self) -> str:
        return str(self.metrics.get("status", "failed"))


def train_size(data: Any) -> Optional[int]:
    """Training examples a data config yields (after the validation split and ``n_train``)."""
    if data.get("n_train") is not None:
        return int(data.n_train)
    base = TRAIN_SET_SIZES.get(data.get("name"))
    if base is None:
        return None
    # The same rounding as regexp.data.splits.split_train_val.
    return base - int(round(float(data.get("val_fraction", 0.0)) * base))


def parse_overrides(lines: List[str]) -> Dict[str, Any]:
    """``["model.width=8", "+experiment=x"]`` -> ``{"model.width": 8, "experiment": "x"}``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out: Dict[str, Any] = {}
    for line in lines:
        try:
            o = parser.parse_overrides([line])[0]
        except Exception:  # not Hydra syntax (hand-written): keep the text
            key, _, value = line.partition("=")
            out[key.lstrip("+~")] = value
            continue
        if o.is_delete() or o.is_sweep_override():
            continue
        out[o.key_or_group] = o.value()
    return {k: v for k, v in out.items() if not k.startswith("hydra") and k not in RUNTIME_KEYS}


# Numbers the results table holds as floats (a column with a missing value is float) that
# metrics.json holds as integers: cast back so that results.csv writes ``1234``, not ``1234.0``.
INT_KEYS = ("params", "epochs", "best.epoch", "final.epoch", "stopped_epoch", "diverged_epoch")


def _value(v: Any) -> Any:
    """A table cell as metrics.json held it: numpy scalars as Python ones, NaN/None as missing."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return _MISSING
    return v


_MISSING = object()


def metrics_of(row: Dict[str, Any], history: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """The part of a run's metrics.json the reports use, back from its :func:`regexp.results.load`
    row (and its :func:`regexp.results.load_history` epochs): status, error, params, epochs,
    wall_s, ``final``/``best``, ``probes`` and ``history``, with integers as integers."""
    m: Dict[str, Any] = {"status": str(row.get("status", "failed"))}
    for key, v in row.items():
        v = _value(v)
        if v is _MISSING:
            continue
        if key in INT_KEYS and isinstance(v, float) and v.is_integer():
            v = int(v)
        if key.startswith(("final.", "best.")):
            part, _, name = key.partition(".")
            m.setdefault(part, {})[name] = v
        elif key in ("error", "params", "epochs", "wall_s"):
            m[key] = v
        elif key.startswith("probes."):  # probe=[...]: the final weights' values
            m.setdefault("probes", {})[key[len("probes."):]] = v
    if history:
        m["history"] = list(history)
    return m


def _history(table: Any) -> Dict[str, List[Dict[str, Any]]]:
    """run_dir -> its evaluated epochs as metrics.json lists them (``{"epoch": 1, "test_acc": ...}``)."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for run_dir, epoch, metric, value in table[["run_dir", "epoch", "metric", "value"]].itertuples(index=False):
        epoch = _value(epoch)
        if isinstance(epoch, float) and epoch.is_integer():
            epoch = int(epoch)
        out.setdefault(run_dir, {}).setdefault(epoch, {"epoch": epoch})[metric] = _value(value)
    return {d: list(by_epoch.values()) for d, by_epoch in out.items()}


def _n_train(row: Dict[str, Any]) -> Optional[int]:
    data = {k: _value(row.get(f"data.{k}")) for k in ("name", "n_train", "val_fraction")}
    return train_size(OmegaConf.create({k: None if v is _MISSING else v for k, v in data.items()}))


def _read(root: Path):
    """Each run folder below ``root`` with its results row and its metrics (see :func:`metrics_of`)."""
    from regexp import results

    table = results.load(root)  # raises ConfigError when root holds no run
    history = _history(results.load_history(root))
    # The folders are the table's, listed once: another shard of a sweep may add a run folder
    # while this one reads, and that run is simply not there yet.
    return [(Path(r["run_dir"]), r, metrics_of(r, history.get(r["run_dir"], ())))
            for r in table.to_dict("records")]


def run_metrics(root: Path) -> Dict[Path, Dict[str, Any]]:
    """Run folder -> :func:`metrics_of` its results row, for every run below ``root`` ({} for none)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    try:
        return {d: metrics for d, _, metrics in _read(root)}
    except ConfigError:  # no run there yet
        return {}


def collect_runs(root: Path) -> List[Run]:
    """Every run below ``root``, read by :mod:`regexp.results` (the one reader of run folders):
    its point from the overrides that made it (:func:`regexp.results.recorded_overrides`), its
    numbers from its :func:`~regexp.results.load` row, its epochs from
    :func:`~regexp.results.load_history`."""
    from regexp import results

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"sweep dir {str(root)!r} is not a folder: expected the output folder of a "
                          "sweep (task=sweep) or of a multirun (-m)")
    if not results.find_run_dirs(root):
        raise ConfigError(f"sweep dir {str(root)!r} holds no runs: expected folders with metrics.json "
                          "or .hydra/overrides.yaml below it")
    runs = []
    for d, row, metrics in _read(root):
        point: Dict[str, Any] = {}
        for lines in results.recorded_overrides(d, root):
            point.update(parse_overrides(lines))
        if "seed" not in point:
            seed = _value(row.get("seed"))
            point["seed"] = int(seed) if seed is not _MISSING else 0
        runs.append(Run(d, point, metrics, _n_train(row)))
    return runs


def swept_keys(runs: List[Run], x: str) -> List[str]:
    """The point's columns: ``x`` first, then every other key whose value differs between runs, seed last."""
    keys: List[str] = []
    for r in runs:
        keys += [k for k in r.point if k not in keys]
    varying = [k for k in keys if k not in (x, "seed")
               and len({json.dumps(r.point.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    return [x] + varying + ["seed"]
