"""Everything a finished sweep leaves in its folder, from its runs.

``results.csv`` (one row per point and seed, numbers straight from each ``metrics.json``),
``curve.csv`` (the mean/std over seeds that is plotted), ``<name>.png`` and the sweep-level
TensorBoard event file. The ``sweep`` task calls :func:`report` after training;
``scripts/plot_sweep.py`` calls it on any existing sweep folder. The runs come from
:func:`regexp.analysis.collect.collect_runs`, which reads run folders through :mod:`regexp.results`.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from regexp.analysis.collect import Run, swept_keys
from regexp.analysis.curves import METRICS, PROBE_METRICS, Bump, Curve, aggregate, bump, category_label, epoch_rows, numeric_position
from regexp.analysis.emc import lookup
from regexp.analysis.plots import plot_axes, plot_curve
from regexp.analysis.tb import log_curve
from regexp.errors import ConfigError
from regexp.sweep import result_row, write_csv

EPOCH = "epoch"  # x key of epoch-wise curves, read from each run's history


@dataclass
class PlotSettings:
    name: str = "sweep"  # the PNG is <name>.png
    title: str = ""
    x_label: Optional[str] = None
    invert_x: bool = False  # plot 1/x (test error against 1/λ)
    hue: Optional[str] = None  # the one swept key that splits the curve (default: every other swept key)


def plot_settings(extra: Any) -> PlotSettings:
    """Read ``extra.plot`` of a sweep's config, naming any bad key."""
    given = dict(extra.get("plot") or {}) if extra is not None else {}
    valid = PlotSettings.__dataclass_fields__
    for k, v in given.items():
        if k not in valid:
            raise ConfigError(f"extra.plot.{k} is unknown: expected one of {', '.join(valid)}")
    s = PlotSettings(**given)
    if not isinstance(s.name, str) or not s.name or "/" in s.name:
        raise ConfigError(f"extra.plot.name={s.name!r} is invalid: expected a file name without '/'")
    if not isinstance(s.invert_x, bool):
        raise ConfigError(f"extra.plot.invert_x={s.invert_x!r} is invalid: expected true or false")
    if s.hue is not None and (not isinstance(s.hue, str) or not s.hue):
        raise ConfigError(f"extra.plot.hue={s.hue!r} is invalid: expected a swept key (e.g. optimizer) or null")
    return s


def result_rows(runs: Sequence[Run], keys: Sequence[str],
                emc: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """One CSV row per run: its point, then the numbers of its metrics.json (and, with ``emc``,
    model key -> {emc, censored} of ``extra.emc``, its model's effective complexity)."""
    rows = []
    for run in runs:
        row = result_row({k: run.point.get(k, "") for k in keys}, run.metrics)
        out: Dict[str, Any] = {}
        for k, v in row.items():
            out[k] = v
            if k == "params":
                out["n_train"] = run.n_train if run.n_train is not None else ""
                if emc is not None:
                    found = lookup(emc, run.point) or {}
                    out["emc"] = "" if found.get("emc") is None else found["emc"]
                    out["emc_censored"] = found.get("censored", "")
        out["error"] = run.metrics.get("error", "")
        rows.append(out)
    return rows


def write_curve_csv(curve: Curve, path: Path) -> None:
    points = [p for s in curve.series for p in s.points]
    has_emc = any(p.emc is not None for p in points)
    metrics = METRICS + tuple(m for m in PROBE_METRICS if any(m in p.mean for p in points))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["series", curve.x_key, "seeds", "params", "n_train", "threshold"]
                   + (["emc", "emc_censored"] if has_emc else [])
                   + [f"{m}_{s}" for m in metrics for s in ("mean", "std")])
        for s in curve.series:
            for p in s.points:
                w.writerow([s.name, p.raw, p.n, "" if p.params is None else p.params,
                            "" if p.n_train is None else p.n_train, "" if s.threshold is None else s.threshold]
                           + (["" if p.emc is None else p.emc, p.emc_censored] if has_emc else [])
                           + [d.get(m, "") for m in metrics for d in (p.mean, p.std)])


def _order(value: Any):
    """Sort key of a swept value: numbers (lists by their first entry) by size, then anything else
    by its override text, so categories (whole lists too) come in one order whatever the run order."""
    f = numeric_position(value)
    return (0, f, "") if f is not None else (1, 0.0, category_label(value))


def _series_keys(runs: Sequence[Run], keys: Sequence[str], x: str, hue: Optional[str], sweep_dir: Path) -> List[str]:
    """The keys that split the curve: ``hue`` alone when given (any other swept key is pooled with
    the seeds), else every key other than ``x`` and ``seed`` that varies."""
    # A key held at one value (a fixed width next to a swept depth) labels no series.
    varying = [k for k in keys if k not in (x, "seed") and len({str(r.point.get(k)) for r in runs}) > 1]
    if hue is None:
        return varying
    valid = [k for k in keys if k not in (x, "seed")]
    if hue not in valid:
        raise ConfigError(f"hue={hue!r} is not a swept key of {sweep_dir} other than x={x!r}: expected one of "
                          f"{', '.join(valid) if valid else '(none: the sweep varies no other key)'}")
    return [hue]


def report(sweep_dir: Path, runs: Sequence[Run], x: str, settings: PlotSettings,
           keys: Optional[Sequence[str]] = None, emc: Optional[Dict[str, Dict[str, Any]]] = None) -> Curve:
    """Write results.csv, curve.csv, the PNG and the sweep-level TensorBoard run; return the curve.

    With ``emc`` (model key -> {emc, censored}, from ``extra.emc``) also ``<name>_emc.png``: the
    error against the swept key, the parameter count and the effective model complexity."""
    sweep_dir = Path(sweep_dir)
    keys = list(keys) if keys is not None else swept_keys(runs, x)
    if x != EPOCH and not any(x in r.point for r in runs):
        found: List[str] = []
        for r in runs:
            found += [k for k in r.point if k not in found and k != "seed"]
        raise ConfigError(f"x={x!r} is not a swept key of {sweep_dir}: expected one of "
                          f"{', '.join(found + [EPOCH]) or EPOCH}")
    keys = [k for k in keys if k != x]
    if x != EPOCH:
        keys = [x] + keys
    runs = sorted(runs, key=lambda r: [_order(r.point.get(k)) for k in keys])
    series_keys = _series_keys(runs, keys, x, settings.hue, sweep_dir)
    rows = result_rows(runs, keys, emc)
    if x == EPOCH:
        curve_rows = [r for run in runs for r in epoch_rows({k: run.point.get(k) for k in keys}, run.metrics)]
    else:
        curve_rows = rows
    curve = aggregate(curve_rows, x, series_keys)
    if curve.categories is not None and settings.invert_x:
        raise ConfigError(f"invert_x=true is invalid for x={x!r}: its values are categories "
                          f"({', '.join(category_label(c) for c in curve.categories)}), not numbers")
    # Each file appears whole (a temporary file, then a rename): the shards of a sharded sweep
    # (sweep.shards) that finish together may both write the report.
    _atomic(sweep_dir / "results.csv", lambda tmp: write_csv(rows, tmp))
    _atomic(sweep_dir / "curve.csv", lambda tmp: write_curve_csv(curve, tmp))
    figs = []
    _atomic(sweep_dir / f"{settings.name}.png", lambda tmp: figs.append(
        plot_curve(curve, tmp, settings.title, settings.x_label, settings.invert_x)))
    log_curve(sweep_dir, curve, figs[0])
    if emc is not None and x != EPOCH and curve.categories is None:
        _atomic(sweep_dir / f"{settings.name}_emc.png", lambda tmp: plot_axes(
            curve, tmp, settings.title, settings.x_label))
    return curve


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` a temporary file next to ``path`` (same suffix, for matplotlib), then rename it."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_bump(b: Bump) -> str:
    """One line: the largest rise of the mean and the fall after it, each against twice the seed spread."""
    def verdict(change: float, spread: float) -> str:
        return f"seed spread {spread:.4f}: {'exceeds' if change > 2 * spread else 'within'} 2× spread"

    line = (f"{b.metric}: rises {b.trough.mean[b.metric]:.4f} → {b.peak.mean[b.metric]:.4f} (+{b.rise:.4f}) "
            f"from {b.trough.raw} to {b.peak.raw}, {verdict(b.rise, b.rise_spread)}")
    if b.after is None:
        return line + "; the peak is the last point"
    return line + (f"; then falls to {b.after.mean[b.metric]:.4f} (−{b.fall:.4f}) at {b.after.raw}, "
                   f"{verdict(b.fall, b.fall_spread)}")


def format_curve(curve: Curve, max_lines: int = 30, invert_x: bool = False) -> str:
    """The curve as a small text table (mean ± std over seeds) for the console, then for a numeric
    x the largest rise of the test error and loss (in plotted order: by 1/x when ``invert_x``)."""
    lines = []
    for s in curve.series:
        if s.name:
            lines.append(f"[{s.name}]")
        lines.append(f"{curve.x_key:>14} {'params':>9} {'seeds':>5} {'train_error':>15} {'test_error':>15}")
        stride = max(1, -(-len(s.points) // max_lines))
        for p in s.points[::stride]:
            cells = [f"{p.mean[m]:.4f}±{p.std[m]:.4f}" if m in p.mean else "-" for m in ("train_error", "test_error")]
            params = f"{p.params:.0f}" if p.params is not None else "-"
            raw = category_label(p.raw) if curve.categories is not None else str(p.raw)
            lines.append(f"{raw:>14} {params:>9} {p.n:>5} {cells[0]:>15} {cells[1]:>15}")
        if s.threshold:
            lines.append(f"interpolation threshold (params = n_train): {curve.x_key} ≈ {s.threshold:.3g}")
        if curve.categories is None:
            bumps = [bump(s.points, m, invert_x) for m in ("test_error", "test_loss")]
            lines += [format_bump(b) for b in bumps if b is not None]
    return "\n".join(lines)
