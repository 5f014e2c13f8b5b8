"""Find the runs below a sweep folder and recover, for each, the point it trained and its metrics.

Works on both layouts a sweep can have:

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

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


def _read_metrics(path: Path) -> Dict[str, Any]:
    if not path.exists():
        return {"status": "failed", "error": "no metrics.json (the job died before finishing)"}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"status": "failed", "error": f"unreadable metrics.json ({type(e).__name__})"}


def _chain(root: Path, run_dir: Path) -> List[Path]:
    """The folders from ``root`` down to ``run_dir``, both included."""
    rel = run_dir.relative_to(root).parts
    return [root.joinpath(*rel[:i]) for i in range(len(rel) + 1)]


def _load_run(root: Path, run_dir: Path) -> Run:
    metrics = _read_metrics(run_dir / "metrics.json")
    point: Dict[str, Any] = {}
    config: Optional[DictConfig] = None
    for d in _chain(root, run_dir):
        hydra_dir = d / ".hydra"
        if (hydra_dir / "overrides.yaml").exists():
            point.update(parse_overrides(yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []))
        if (hydra_dir / "config.yaml").exists():
            config = OmegaConf.load(hydra_dir / "config.yaml")
    point.update(parse_overrides(list(metrics.get("overrides") or [])))
    if "seed" not in point:
        point["seed"] = int(config.seed) if config is not None and "seed" in config else 0
    data = config.data if config is not None and "data" in config else OmegaConf.create({})
    data = OmegaConf.merge(data, {k[len("data."):]: v for k, v in point.items()
                                  if k.startswith("data.") and "." not in k[len("data."):]})
    return Run(run_dir, point, metrics, train_size(data))


def find_run_dirs(root: Path) -> List[Path]:
    """Folders holding a run: ``metrics.json`` with no run below it, or a Hydra job that left none."""
    finished = {p.parent for p in root.rglob("metrics.json")}
    # A sweep folder that recorded its own failure also holds runs below it: it is not one.
    runs = {d for d in finished if not any(d in o.parents for o in finished)}
    for overrides in root.rglob(".hydra/overrides.yaml"):
        job = overrides.parent.parent
        if job not in finished and not any(job in d.parents for d in finished):
            runs.add(job)
    return sorted(runs)


def collect_runs(root: Path) -> List[Run]:
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"sweep dir {str(root)!r} is not a folder: expected the output folder of a "
                          "sweep (task=sweep) or of a multirun (-m)")
    runs = [_load_run(root, d) for d in find_run_dirs(root)]
    if not runs:
        raise ConfigError(f"sweep dir {str(root)!r} holds no runs: expected folders with metrics.json "
                          "or .hydra/overrides.yaml below it")
    return runs


def swept_keys(runs: List[Run], x: str) -> List[str]:
    """The point's columns: ``x`` first, then every other key whose value differs between runs, seed last."""
    keys: List[str] = []
    for r in runs:
        keys += [k for k in r.point if k not in keys]
    varying = [k for k in keys if k not in (x, "seed")
               and len({json.dumps(r.point.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    return [x] + varying + ["seed"]
