"""In-process sweeps: train one run per point of a grid (× seeds) below one sweep folder.

Each point gets its own folder named by its overrides, holding exactly what a single
``python -m regexp.run`` would write; a point whose folder already holds a completed run is
skipped, so re-running a sweep only trains what is missing. ``results.csv`` has one row per
point and seed.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import pickle
import traceback
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from regexp.config import check_finite_value, validate
from regexp.errors import ConfigError
from regexp.progress import SweepProgress, epochs_done, point_epochs
from regexp.train import signals

log = logging.getLogger("regexp.sweep")


def grid(params: Dict[str, Sequence[Any]], seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """Every combination of the swept values, seed last (so a point's seeds sit together)."""
    keys = list(params)
    points = []
    for values in itertools.product(*(params[k] for k in keys)):
        for seed in seeds:
            points.append({**dict(zip(keys, values)), "seed": seed})
    return points


# A point's folder name: file systems cap a name at 255 bytes; leave room for suffixes.
NAME_BYTES = 200


def point_name(point: Dict[str, Any]) -> str:
    """``key=value,...`` of the point; past NAME_BYTES, its head and a digest of the whole (so
    points that share the head keep their own folders; metrics.json has every override)."""
    full = ",".join(f"{k}={_fmt(v)}" for k, v in point.items())
    raw = full.encode()
    if len(raw) <= NAME_BYTES:
        return full
    digest = hashlib.sha1(raw).hexdigest()[:12]
    return raw[:NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore") + "~" + digest


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(_fmt, v)) + "]"
    return str(v)


def point_config(base: DictConfig, point: Dict[str, Any]) -> DictConfig:
    # a copy through pickle's bytes in memory (our own object, never a file): OmegaConf's
    # __deepcopy__ walks every node in Python, 3x slower, per point of a sweep of hundreds
    cfg = pickle.loads(pickle.dumps(base))
    OmegaConf.set_struct(cfg, True)
    for key, value in point.items():
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"sweep key {key!r} is not in the config")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def point_job(point: Dict[str, Any], sweep_dir: Path) -> Tuple[Path, List[str]]:
    """A point's run folder and its overrides, as its metrics.json records them."""
    return sweep_dir / point_name(point), [f"{k}={_fmt(v)}" for k, v in point.items()]


# Bases whose whole tree passed validate(), by id (the object kept, so the id stays its own).
_VALID_BASES: Dict[int, DictConfig] = {}


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, tuple)) and all(_scalar(x) for x in v))


def checked_config(base: DictConfig, point: Dict[str, Any]) -> DictConfig:
    """The point's config, range-checked (a bad value raises ConfigError naming its key).

    The walk over every key (unknown keys, non-finite numbers) is the slow part of validate()
    and what a point could change of it is only its own values: a point sets existing keys
    (point_config refuses others) in a struct config, so once its base has passed the walk, a
    point of plain values needs only the ranges and its own values' finiteness checked."""
    cfg = point_config(base, point)
    if id(base) not in _VALID_BASES:
        try:
            validate(base)
            _VALID_BASES[id(base)] = base
        except ConfigError:  # e.g. a key only the points fill: each point is checked whole
            pass
    if _VALID_BASES.get(id(base)) is base and all(_scalar(v) for v in point.values()):
        for key in point:  # as the config holds it ("inf" given to a float key is inf there)
            value = OmegaConf.select(cfg, key)
            check_finite_value(key, OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)
        validate(cfg, walk=False)
    else:
        validate(cfg)
    return cfg


def result_row(point: Dict[str, Any], metrics: Dict[str, Any]) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(point)
    row["status"] = metrics.get("status", "failed")
    final, best = metrics.get("final") or {}, metrics.get("best") or {}
    row["params"] = metrics.get("params", "")
    row["epochs"] = metrics.get("epochs", "")
    for s in ("train", "val", "test"):
        row[f"{s}_error"] = 1.0 - final[f"{s}_acc"] if f"{s}_acc" in final else ""
        row[f"{s}_loss"] = final.get(f"{s}_loss", "")
    row["best_epoch"] = best.get("epoch", "")
    row["best_val_error"] = 1.0 - best["val_acc"] if "val_acc" in best else ""
    row["best_test_error"] = 1.0 - best["test_acc"] if "test_acc" in best else ""
    row["wall_s"] = metrics.get("wall_s", "")
    for k, v in (metrics.get("probes") or {}).items():  # probe=[...]: the final weights' values
        row[f"probes.{k}"] = v
    return row


def run_points(base: DictConfig, points: List[Dict[str, Any]], sweep_dir: Path) -> List[Dict[str, Any]]:
    """Train every point one after the other; a failing point is recorded and the rest go on.

    Progress (``regexp.progress``): one bar over all points' epochs on a terminal, whatever
    ``trainer.progress`` says (the per-run bars are off inside a sweep, so that bars do not
    stack), and one ``[i/n] <point>: <status> ...`` log line per finished point."""
    from regexp.train.io import read_json, write_json
    from regexp.train.trainer import train
    from regexp.population import train_population, use_population

    progress = SweepProgress(points, point_epochs(base, points))
    try:
        if use_population(base, points):  # sweep.engine: population, or auto with every point compatible
            trained = train_population(base, points, sweep_dir, progress=progress)
            return [result_row(p, m) for p, m in zip(points, trained)]
        for i, point in enumerate(points):  # how far an earlier launch got: the bar starts there
            metrics = point_job(point, sweep_dir)[0] / "metrics.json"
            if metrics.exists() and not base.trainer.get("overwrite", False):
                try:
                    progress.start(i, epochs_done(read_json(metrics), progress.epochs[i]))
                except Exception:  # unreadable: the point's own run reports it
                    pass
        progress.open()
        rows = []
        for i, point in enumerate(points):
            signals.check()  # once asked to stop, start no new point
            out, overrides = point_job(point, sweep_dir)
            progress.stage(point_name(point))
            try:
                cfg = checked_config(base, point)
                cfg.trainer.progress = False  # the sweep's bar stands for it (a runtime key: resumes, skips alike)
                metrics = train(cfg, out, overrides, sweep=True,
                                on_epoch=lambda row, i=i: progress.reach(i, row["epoch"]) or False)
            except Exception as e:  # recorded in the row and the point's folder; the sweep goes on
                msg = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
                log.error("point %s failed: %s\n%s", point_name(point), msg, traceback.format_exc())
                out.mkdir(parents=True, exist_ok=True)
                if not (out / "metrics.json").exists():
                    write_json(out / "metrics.json", {"status": "failed", "error": msg, "overrides": overrides})
                metrics = {"status": "failed", "error": msg}
            rows.append(result_row(point, metrics))
            progress.finish(i, rows[-1])  # logs "[i/n] <point>: <status> ..."
        signals.check()  # the last point was interrupted: the sweep stops here too
        return rows
    finally:
        progress.close()


def _summary(row: Dict[str, Any]) -> str:
    """`` train_error=0.0000 test_error=0.4812 (12.3 s)`` for the progress log, when known."""
    parts = [f" {k}={row[k]:.4f}" for k in ("train_error", "test_error") if isinstance(row.get(k), float)]
    if isinstance(row.get("wall_s"), (int, float)):
        parts.append(f" ({row['wall_s']:.1f} s)")
    return "".join(parts)


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
