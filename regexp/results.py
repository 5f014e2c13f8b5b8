"""Every run below a folder as one pandas table: the one reader of run folders.

A *run folder* is what one training leaves: a single run, a multirun job, a point of an
in-process sweep (``task=sweep``) or a population member. Each holds ``metrics.json``; which
folders below a root are runs is decided by :func:`find_run_dirs`
(a ``metrics.json`` with no run below it, or a Hydra job folder that died before writing one),
so a sweep folder's own ``metrics.json`` never becomes a row and a crashed job never vanishes.

:func:`load` gives one row per run::

    from regexp.results import load, load_history

    df = load("outputs/multirun/2024-05-01/12-00-00")
    df.groupby("model.width")["final.test_acc"].mean()
    df[df.status == "completed"].pivot_table("final.test_acc", "model.width", "optimizer.lr")

and :func:`load_history` the per-epoch numbers in long form, to be joined with it on ``run_dir``::

    h = load_history(path).merge(df[["run_dir", "model.width", "seed"]], on="run_dir")
    h[h.metric == "test_acc"].groupby(["model.width", "epoch"])["value"].mean()

Columns of :func:`load`, in this order:

- ``run_dir``: the run folder, as ``str(Path(path) / <relative path>)``; rows are sorted by it;
- ``status`` (``completed``, ``failed``, ``diverged``, ``interrupted``, ...) and ``error``
  (the failure's message, missing otherwise);
- every key of the run's fully resolved config, flattened with dots (``seed``, ``model.width``,
  ``optimizer.lr``, ``regularizer.dropout.p``, ``trainer.batch_size``, ...). **Lists** (and
  tuples) are kept as their command-line string, exactly as an override spells them and as
  a sweep names its point folders: ``model.channels == "[8,16,32]"`` (so every column is
  hashable and ``groupby`` works; ``yaml.safe_load`` gives the list back). Empty dicts
  (``regularizer: {}``) leave no column;
- ``regularizers``: the active regularizers' names, comma-joined in config order
  (``"dropout,weight_decay"``; ``""`` for none);
- ``final.<m>`` and ``best.<m>`` for every number of ``metrics.json``'s ``final``/``best``
  (``epoch``, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss``,
  ``test_acc``; ``best.epoch`` is the epoch of the best validation accuracy);
- ``params``, ``epochs``, ``wall_s``, ``device``, ``threads``, ``threads_reason`` and, where
  a run recorded them, ``stopped_epoch``, ``diverged_epoch``, ``signal``;
- ``overrides``: the run's command-line overrides joined by spaces;
- ``extra.<key>`` for every number a regularizer reported in ``metrics.json``'s ``extra``.
  (The config's own free-form ``extra`` node flattens to ``extra.<key>`` too; where both
  hold the same key, the ``metrics.json`` number wins.)

Numbers stay numbers: a column is numeric whenever its values are, with NaN where a run lacks
the key (a failed run has no metrics; a folder written by another model has no
``model.width``).

Where the config comes from: ``metrics.json``'s ``config`` (the resolved config train()
records). Older folders and jobs that failed before training lack it; then the run folder's
``.hydra/config.yaml`` is read, else that of the nearest folder above it (an in-process
sweep's), else the enclosing multirun's ``multirun.yaml`` (interpolations that can be
resolved outside Hydra are; the others keep their ``${...}`` text), and the run's recorded
overrides are applied on top of it. A group choice that differs from that base
(``model=cnn`` over a base composed with ``mlp``) cannot be recomposed without Hydra: that
group's columns are then only ``model.name``; ``regularizer=[a,b]`` sets ``regularizers``
and keeps only those regularizers' nodes. With no config file at all the columns come from
the overrides alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from regexp.errors import ConfigError

__all__ = ["load", "load_history", "run_row", "flatten", "find_run_dirs", "recorded_overrides"]

# Config groups whose choice (``model=cnn``) names the node's ``name`` field.
GROUPS = ("data", "model", "optimizer", "scheduler")
# Scalar metrics.json keys copied as they are, in this order (the last three only some runs record).
RUN_KEYS = ("params", "epochs", "wall_s", "device", "threads", "threads_reason")
METRIC_SCALARS = ("stopped_epoch", "diverged_epoch", "signal")

PathLike = Union[str, Path]


# ---------------------------------------------------------------- public API
def load(path: PathLike) -> pd.DataFrame:
    """One row per run folder below ``path`` (``path`` itself may be one); see the module doc.

    >>> df = load("outputs/multirun/2024-05-01/12-00-00")            # doctest: +SKIP
    >>> df.groupby("model.width")["final.test_acc"].mean()          # doctest: +SKIP

    Raises :class:`~regexp.errors.ConfigError` when ``path`` is not a folder or holds no run.
    """
    root, dirs = _run_dirs(path)
    rows = [run_row(d, root) for d in dirs]
    df = pd.DataFrame.from_records(rows, columns=_column_order(rows))
    return df.sort_values("run_dir", kind="stable").reset_index(drop=True)


def load_history(path: PathLike) -> pd.DataFrame:
    """Per-epoch numbers of every run below ``path``, long form: one row per (run, evaluated
    epoch, metric), columns ``run_dir``, ``epoch``, ``metric`` (``"test_acc"``, ...), ``value``.

    Only evaluated epochs appear (``trainer.eval_every``); a run without history (failed) has
    no row. Join with :func:`load` on ``run_dir`` for the config::

        h = load_history(path).merge(load(path)[["run_dir", "model.width"]], on="run_dir")
        h.pivot_table("value", ["model.width", "epoch"], "metric")

    Raises :class:`~regexp.errors.ConfigError` like :func:`load`.
    """
    root, dirs = _run_dirs(path)
    records = []
    for d in dirs:
        run_dir = str(d)
        for entry in _read_metrics(d / "metrics.json").get("history") or []:
            if not isinstance(entry, dict):
                continue
            epoch = entry.get("epoch")
            for metric, value in entry.items():
                if metric != "epoch":
                    records.append((run_dir, epoch, metric, _number(value)))
    df = pd.DataFrame.from_records(records, columns=["run_dir", "epoch", "metric", "value"])
    df["value"] = df["value"].astype(float)
    df["epoch"] = pd.to_numeric(df["epoch"])
    return df.sort_values(["run_dir", "epoch"], kind="stable").reset_index(drop=True)


def run_row(run_dir: Path, root: Optional[Path] = None) -> Dict[str, Any]:
    """The :func:`load` row of one run folder, as a dict (``root``: where to stop looking for
    ``.hydra/config.yaml`` downward; the search goes on above it when none is found there)."""
    run_dir = Path(run_dir)
    metrics = _read_metrics(run_dir / "metrics.json")
    row: Dict[str, Any] = {"run_dir": str(run_dir), "status": str(metrics.get("status", "failed")),
                           "error": metrics.get("error")}
    overrides = [str(o) for o in metrics.get("overrides") or []]
    if not overrides:
        overrides = _hydra_overrides(run_dir)
    config = metrics.get("config")
    if isinstance(config, dict):
        row.update(_config_columns(config))
    else:
        row.update(_config_from_files(run_dir, overrides))
    for part in ("final", "best"):
        for k, v in (metrics.get(part) or {}).items():
            row[f"{part}.{k}"] = _number(v)
    for k in RUN_KEYS + METRIC_SCALARS:
        if k in metrics:
            row[k] = metrics[k]
    row["overrides"] = " ".join(overrides)
    for k, v in flatten(metrics.get("extra") or {}, "extra").items():
        row[k] = v
    for k, v in (metrics.get("probes") or {}).items():  # the final weights' probe values
        row[f"probes.{k}"] = _number(v)
    return row


def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"model": {"width": 8, "channels": [8, 16]}}`` -> ``{"model.width": 8, "model.channels": "[8,16]"}``."""
    out: Dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = _fmt(node) if isinstance(node, (list, tuple)) else node
    return out


def find_run_dirs(root: Path) -> List[Path]:
    """Folders holding a run: ``metrics.json`` with no run below it, or a Hydra job that left none."""
    root = Path(root)
    finished = {p.parent for p in root.rglob("metrics.json")}
    # A sweep folder that recorded its own failure also holds runs below it: it is not one.
    runs = {d for d in finished if not any(d in o.parents for o in finished)}
    for overrides in root.rglob(".hydra/overrides.yaml"):
        job = overrides.parent.parent
        if job not in finished and not any(job in d.parents for d in finished):
            runs.add(job)
    return sorted(runs)


def recorded_overrides(run_dir: PathLike, root: PathLike) -> List[List[str]]:
    """Every override that made a run, outermost first: the ``.hydra/overrides.yaml`` of each
    folder from ``root`` down to ``run_dir`` (a multirun job's, an in-process sweep's own), then
    the overrides ``run_dir``'s ``metrics.json`` records (a sweep point's). The sweep reports
    take a run's swept point from these (:func:`regexp.analysis.collect.collect_runs`)."""
    root, run_dir = Path(root), Path(run_dir)
    rel = run_dir.relative_to(root).parts
    out = [_hydra_overrides(root.joinpath(*rel[:i])) for i in range(len(rel) + 1)]
    out.append([str(o) for o in _read_metrics(run_dir / "metrics.json").get("overrides") or []])
    return out


# ---------------------------------------------------------------- internals
def _read_metrics(path: Path) -> Dict[str, Any]:
    if not path.exists():
        return {"status": "failed", "error": "no metrics.json (the job died before finishing)"}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"status": "failed", "error": f"unreadable metrics.json ({type(e).__name__})"}


def _run_dirs(path: PathLike) -> Tuple[Path, List[Path]]:
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"results path {str(root)!r} is not a folder: expected a run folder or a folder "
                          "holding runs (a multirun, a sweep, an outputs/ tree)")
    dirs = find_run_dirs(root)
    if not dirs:
        raise ConfigError(f"results path {str(root)!r} holds no runs: expected run folders with metrics.json "
                          "(or Hydra job folders with .hydra/overrides.yaml) in or below it")
    return root, dirs


def _fmt(v: Any) -> str:
    """A list as an override spells it (``[8,16]``); the same as regexp.sweep names point folders."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return "null" if v is None else str(v)


def _number(v: Any) -> Any:
    """A metric as a float (NaN for None); anything else unchanged."""
    if v is None:
        return math.nan
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def _config_columns(config: Dict[str, Any]) -> Dict[str, Any]:
    cols = flatten({k: v for k, v in config.items()})
    regs = config.get("regularizer")
    cols["regularizers"] = ",".join(regs) if isinstance(regs, dict) else ""
    return cols


def _hydra_overrides(run_dir: Path) -> List[str]:
    import yaml

    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.exists():
        return []
    try:
        return [str(o) for o in yaml.safe_load(f.read_text()) or []]
    except (OSError, ValueError, yaml.YAMLError):
        return []


def _nearest_hydra_config(run_dir: Path) -> Optional[Path]:
    """The config a run folder was composed from: its own ``.hydra/config.yaml``, else that of
    the nearest folder above it (an in-process sweep's); the search stops at a multirun's
    folder, whose ``multirun.yaml`` (the config before each job's overrides) is the answer."""
    for d in [run_dir, *run_dir.resolve().parents]:
        if (d / ".hydra" / "config.yaml").exists():
            return d / ".hydra" / "config.yaml"
        if (d / "multirun.yaml").exists():
            return d / "multirun.yaml"
    return None


def _lenient(node: Any) -> Any:
    """A plain container of ``node``, resolving every interpolation that resolves outside Hydra."""
    if isinstance(node, DictConfig):
        out = {}
        for k in node.keys():
            try:
                v = node[k]
            except Exception:  # ${hydra:...}, a missing env variable, a broken reference
                v = node._get_node(k)._value()
            out[str(k)] = _lenient(v)
        return out
    if isinstance(node, ListConfig):
        out_l = []
        for i in range(len(node)):
            try:
                v = node[i]
            except Exception:
                v = node._get_node(i)._value()
            out_l.append(_lenient(v))
        return out_l
    return node


def _parsed(overrides: List[str]) -> Iterator[Tuple[str, Any, bool]]:
    """(key, value, is_add) of each plain override; sweeps, deletions and hydra.* are skipped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for line in overrides:
        try:
            o = parser.parse_overrides([line])[0]
        except Exception:  # not Hydra syntax (hand-written): keep the text
            key, _, value = line.partition("=")
            key = key.lstrip("+~")
            if not key.startswith("hydra"):
                yield key, value, True
            continue
        if o.is_delete() or o.is_sweep_override() or o.key_or_group.startswith("hydra"):
            continue
        yield o.key_or_group, o.value(), o.is_add() or o.is_force_add()


def _config_from_files(run_dir: Path, overrides: List[str]) -> Dict[str, Any]:
    f = _nearest_hydra_config(run_dir)
    config: Dict[str, Any] = {}
    if f is not None:
        try:
            loaded = OmegaConf.load(f)
            if isinstance(loaded, DictConfig):
                loaded.pop("hydra", None)  # multirun.yaml: Hydra's own settings are no column
            config = _lenient(loaded)
        except Exception:  # unreadable yaml: fall back to the overrides alone
            config = {}
    if not isinstance(config, dict):
        config = {}

    regs: Optional[List[str]] = None
    for key, value, _ in _parsed(overrides):
        if key == "regularizer" and not isinstance(value, dict):
            regs = [str(v) for v in (value if isinstance(value, list) else [value] if value else [])]
            continue  # the group choice: applied below
        node, parts = config, key.split(".")
        existing = _get(config, parts)
        if key in GROUPS and isinstance(value, str) and (existing is None or isinstance(existing, dict)):
            # A group choice (model=cnn). A job's own config already holds that node; a sweep's
            # or multirun's base holds the default one, so only the choice's name is known.
            if isinstance(existing, dict) and existing.get("name") == value:
                continue
            config[key] = {"name": value}
            continue
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = value
    reg_node = config.get("regularizer")
    if regs is not None:  # the job's own list; a base's nodes of other regularizers are dropped
        config["regularizer"] = {k: v for k, v in (reg_node if isinstance(reg_node, dict) else {}).items()
                                 if k in regs}
    cols = flatten(config)
    if regs is not None:
        cols["regularizers"] = ",".join(regs)
    elif isinstance(reg_node, dict):
        cols["regularizers"] = ",".join(reg_node)
    return cols


def _get(config: Dict[str, Any], parts: List[str]) -> Any:
    node: Any = config
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _column_order(rows: List[Dict[str, Any]]) -> List[str]:
    """run_dir, status, error, config columns, regularizers, metrics, run facts, extra.*."""
    seen: List[str] = []
    seen_set = set()
    for r in sorted(rows, key=len, reverse=True):  # the fullest config sets the order
        for k in r:
            if k not in seen_set:
                seen.append(k)
                seen_set.add(k)
    head = ["run_dir", "status", "error"]
    metric_cols = [k for p in ("final.", "best.") for k in seen if k.startswith(p)]
    run_cols = [k for k in RUN_KEYS if k in seen_set]
    others = [k for k in seen if k not in head and k not in metric_cols and k not in run_cols
              and k not in ("overrides", "regularizers")]
    extra_cols = [k for k in others if k.startswith("extra.")]
    meta = [k for k in METRIC_SCALARS if k in seen_set]
    config_cols = [k for k in others if not k.startswith("extra.") and k not in meta]
    regs = ["regularizers"] if "regularizers" in seen_set else []
    return head + config_cols + regs + metric_cols + run_cols + meta + ["overrides"] + extra_cols
