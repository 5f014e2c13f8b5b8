"""Average runs over seeds into curves against the swept value; find the interpolation threshold.

A *curve* has one *series* per combination of the swept keys other than ``x`` and ``seed``
(a single series for a one-key sweep). Each of its points is the mean and standard deviation
over the completed seeds at one ``x``; failed or diverged runs are left out, so a crashed job
leaves a gap rather than a wrong number.

An ``x`` whose values are not all numbers (optimizer names, regularizer lists, booleans) is
*categorical*: each value is a category placed at its index, in the order the values first
appear in the rows, and the curve keeps the values in ``Curve.categories`` for the axis labels.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

from regexp.errors import ConfigError

METRICS = ("train_error", "test_error", "train_loss", "test_loss")
# Curvature of the final weights, when the runs had probe=[hessian] (results.csv's columns):
# averaged like the errors, drawn in a panel of their own.
PROBE_METRICS = ("probes.hessian/top1", "probes.hessian/trace")


@dataclass
class CurvePoint:
    x: float  # numeric position on the axis
    raw: Any  # the swept value as configured (a list for model.channels)
    n: int  # completed seeds averaged
    mean: Dict[str, float]
    std: Dict[str, float]
    params: Optional[float] = None
    n_train: Optional[float] = None
    emc: Optional[float] = None  # effective model complexity (extra.emc), where it is plotted
    emc_censored: bool = False  # the measured sizes do not bracket it (EMC >= emc)


@dataclass
class Series:
    name: str  # "" for a one-key sweep, else e.g. "data.label_noise=0.15"
    points: List[CurvePoint] = field(default_factory=list)
    threshold: Optional[float] = None  # x where parameters = training samples


@dataclass
class Curve:
    x_key: str
    series: List[Series]
    categories: Optional[List[Any]] = None  # the x values, in axis order, when x is categorical


def category_label(v: Any) -> str:
    """A category as it is written in an override: ``adam``, ``true``, ``[weight_decay,dropout]``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(category_label(e) for e in v) + "]"
    return str(v)


def _identity(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def number(v: Any) -> Optional[float]:
    """A float from a row cell (in memory or read back from a CSV), None when empty or not a number."""
    if v is None or v == "" or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def numeric_position(value: Any) -> Optional[float]:
    """Where a swept value sits on a numeric axis (a list, ``model.channels=[k,2k,...]``, at its first
    entry); None when it is not a number."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return number(value)


def x_position(value: Any, key: str) -> float:
    """Where a swept value sits on a numeric axis; an error naming the key when it is not a number."""
    f = numeric_position(value)
    if f is None:
        raise ConfigError(f"sweep.x={key!r} is invalid: its values must be numbers (or lists of numbers) "
                          f"to be plotted, got {value!r}")
    return f


def categories(values: Iterable[Any]) -> Optional[List[Any]]:
    """The distinct values in first-seen order when they cannot share a numeric axis, else None.

    Lists of numbers that start alike (``[4,8]`` and ``[4,16]``) would land on one point of a
    numeric axis and be averaged together, so they are categories too.
    """
    distinct: Dict[str, Any] = {}
    for v in values:
        distinct.setdefault(_identity(v), v)
    positions = [numeric_position(v) for v in distinct.values()]
    if all(p is not None for p in positions) and len(set(positions)) == len(positions):
        return None
    return list(distinct.values())


def _mean_std(values: Sequence[float]):
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))  # sample std over seeds


def threshold(points: Sequence[CurvePoint]) -> Optional[float]:
    """The ``x`` where parameters / training samples crosses 1, interpolated on log scales.

    Model-wise sweeps cross it as the model grows, sample-wise ones as the data grows; sweeps
    that change neither (weight decay, epochs) have no threshold.
    """
    pts = [p for p in points if p.params and p.n_train and p.x > 0]
    for a, b in zip(pts, pts[1:]):
        ra, rb = math.log(a.params / a.n_train), math.log(b.params / b.n_train)
        if ra == 0:
            return a.x
        if ra * rb < 0:
            t = ra / (ra - rb)
            return math.exp(math.log(a.x) + t * (math.log(b.x) - math.log(a.x)))
    if pts and math.log(pts[-1].params / pts[-1].n_train) == 0:
        return pts[-1].x
    return None


def _series_name(row: Dict[str, Any], keys: Sequence[str]) -> str:
    return ",".join(f"{k}={json.dumps(row.get(k), default=str)}" for k in keys)


def aggregate(rows: Iterable[Dict[str, Any]], x_key: str, series_keys: Sequence[str]) -> Curve:
    """Mean and std over seeds of each metric at each ``x``, per series; completed rows only."""
    done = [row for row in rows if row.get("status") == "completed"]
    cats = categories(row[x_key] for row in done)
    index = {_identity(v): float(i) for i, v in enumerate(cats or [])}
    groups: Dict[str, Dict[float, List[Dict[str, Any]]]] = {}
    raws: Dict[float, Any] = {}
    for row in done:
        x = index[_identity(row[x_key])] if cats is not None else x_position(row[x_key], x_key)
        raws.setdefault(x, row[x_key])
        groups.setdefault(_series_name(row, series_keys), {}).setdefault(x, []).append(row)
    series = []
    for name, by_x in groups.items():
        s = Series(name.replace('"', ""))
        for x in sorted(by_x):
            members = by_x[x]
            mean, std = {}, {}
            for m in METRICS + PROBE_METRICS:
                vals = [v for v in (number(r.get(m)) for r in members) if v is not None]
                if vals:
                    mean[m], std[m] = _mean_std(vals)
            params = [v for v in (number(r.get("params")) for r in members) if v is not None]
            n_train = [v for v in (number(r.get("n_train")) for r in members) if v is not None]
            emc = [v for v in (number(r.get("emc")) for r in members) if v is not None]
            s.points.append(CurvePoint(x, raws[x], len(members), mean, std,
                                       sum(params) / len(params) if params else None,
                                       sum(n_train) / len(n_train) if n_train else None,
                                       sum(emc) / len(emc) if emc else None,
                                       any(r.get("emc_censored") is True for r in members)))
        # A threshold is a crossing between neighbouring values: categories have no neighbours.
        s.threshold = threshold(s.points) if cats is None else None
        series.append(s)
    return Curve(x_key, series, cats)


def epoch_rows(point: Dict[str, Any], metrics: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per evaluated epoch of a run's history (epoch-wise double descent)."""
    if metrics.get("status") != "completed":
        return []
    rows = []
    for h in metrics.get("history") or []:
        row: Dict[str, Any] = {**point, "epoch": h["epoch"], "status": "completed",
                               "params": metrics.get("params")}
        for s in ("train", "test"):
            if f"{s}_acc" in h:
                row[f"{s}_error"] = 1.0 - h[f"{s}_acc"]
                row[f"{s}_loss"] = h[f"{s}_loss"]
        rows.append(row)
    return rows


@dataclass
class Bump:
    """The largest rise of a curve's mean, in the order the points are plotted, and the fall after it.

    A double descent is a rise to a peak (``trough`` → ``peak``) followed by a second descent
    (``peak`` → ``after``); a U over 1/λ has a rise and no fall. Each change is set beside the
    seed spread at its two ends (the larger of their standard deviations over seeds): a change
    within twice that spread is not told apart from the seed-to-seed noise.
    """
    metric: str
    trough: CurvePoint
    peak: CurvePoint
    after: Optional[CurvePoint]  # the lowest mean after the peak; None when the peak is the last point

    def _spread(self, a: CurvePoint, b: CurvePoint) -> float:
        return max(a.std.get(self.metric, 0.0), b.std.get(self.metric, 0.0))

    @property
    def rise(self) -> float:
        return self.peak.mean[self.metric] - self.trough.mean[self.metric]

    @property
    def rise_spread(self) -> float:
        return self._spread(self.trough, self.peak)

    @property
    def fall(self) -> float:
        return self.peak.mean[self.metric] - self.after.mean[self.metric] if self.after else 0.0

    @property
    def fall_spread(self) -> float:
        return self._spread(self.peak, self.after) if self.after else 0.0


def bump(points: Sequence[CurvePoint], metric: str, invert_x: bool = False) -> Optional[Bump]:
    """The largest rise of the mean of ``metric`` (a peak above the lowest point plotted before
    it) and the lowest point after that peak; None when the mean never rises. ``invert_x``
    orders the points by 1/x, as the plot of test error against 1/λ does."""
    pts = sorted((p for p in points if metric in p.mean and (p.x or not invert_x)),
                 key=lambda p: 1.0 / p.x if invert_x else p.x)
    best: Optional[Bump] = None
    peak_at = 0
    for j in range(1, len(pts)):
        low = min(pts[:j], key=lambda p: p.mean[metric])
        rise = pts[j].mean[metric] - low.mean[metric]
        if rise > 0 and (best is None or rise > best.rise):
            best, peak_at = Bump(metric, low, pts[j], None), j
    if best is not None and peak_at + 1 < len(pts):
        best.after = min(pts[peak_at + 1:], key=lambda p: p.mean[metric])
    return best
