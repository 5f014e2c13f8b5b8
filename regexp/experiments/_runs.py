"""Training MNIST-1D models for a gallery figure: each point its own run folder, via the sweep code.

The gallery never trains in a private loop when the framework's trainer can do it: every
point goes through :func:`regexp.sweep.run_points`, so it leaves the same metrics.json,
checkpoints and TensorBoard events as a single run, and re-running an experiment skips the
points that already completed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from omegaconf import DictConfig

from regexp.sweep import grid, point_name, run_points
from regexp.train.io import read_json


def run_grid(cfg: DictConfig, params: Mapping[str, Sequence[Any]], seeds: Sequence[int],
             out_dir: Path) -> List[Dict[str, Any]]:
    """Train ``params`` × ``seeds`` below ``out_dir``; each row also names its run folder."""
    return run_listed(cfg, grid(dict(params), list(seeds)), out_dir)


def run_listed(cfg: DictConfig, points: Sequence[Dict[str, Any]], out_dir: Path) -> List[Dict[str, Any]]:
    """Train the given points (not a full grid: they may set different keys) below ``out_dir``."""
    points = list(points)
    rows = run_points(cfg, points, out_dir)
    for point, row in zip(points, rows):
        row["run_dir"] = str(out_dir / point_name(point))
    return rows


def run_variants(variants: Mapping[str, DictConfig], seeds: Sequence[int], out_dir: Path,
                 label: str = "variant") -> List[Dict[str, Any]]:
    """Train whole configs that differ in more than a few keys (another optimizer group ...).

    Variant ``name`` with seed ``s`` trains into ``out_dir/<label>=<name>/seed=<s>``.
    """
    rows = []
    for name, vcfg in variants.items():
        for row in run_grid(vcfg, {}, seeds, out_dir / f"{label}={name}"):
            rows.append({label: name, **row})
    return rows


def history(run_dir: str) -> List[Dict[str, float]]:
    """The per-epoch rows a finished run recorded (empty for a failed one)."""
    path = Path(run_dir) / "metrics.json"
    return read_json(path).get("history", []) if path.exists() else []


def curve_rows(rows: Sequence[Dict[str, Any]], keys: Sequence[str]) -> List[Dict[str, Any]]:
    """Every run's history as long-format rows, labelled by ``keys`` of its results row."""
    out = []
    for row in rows:
        for h in history(row["run_dir"]):
            out.append({**{k: row.get(k, "") for k in keys}, **h})
    return out


def mean_curve(rows: Sequence[Dict[str, Any]], metric: str) -> Tuple[List[int], List[float]]:
    """``metric`` per epoch averaged over the runs (seeds) in ``rows``, on the epochs all share."""
    per_run = [{h["epoch"]: h[metric] for h in history(r["run_dir"]) if metric in h} for r in rows]
    per_run = [p for p in per_run if p]
    if not per_run:
        return [], []
    epochs = sorted(set.intersection(*(set(p) for p in per_run)))
    return epochs, [sum(p[e] for p in per_run) / len(per_run) for e in epochs]


def mean_of(rows: Sequence[Dict[str, Any]], key: str) -> float:
    """Mean of a numeric results column over completed runs (nan when none completed)."""
    vals = [float(r[key]) for r in rows if r.get("status") == "completed" and r.get(key) != ""]
    return sum(vals) / len(vals) if vals else float("nan")


def select(rows: Sequence[Dict[str, Any]], **match: Any) -> List[Dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]
