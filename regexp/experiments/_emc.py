"""``extra.emc`` of a sweep: the effective model complexity of every swept model, measured.

For each point of the sweep (a width, a λ ...) the same training procedure trains again on
smaller nested subsets ``data.n_train`` ∈ ``extra.emc.n_train``; with the sweep's own runs on the
whole training set these give the mean train error over seeds at each n, and
:func:`regexp.analysis.emc.emc_from_errors` turns them into EMC (Nakkiran et al. 2019). The runs
sit below ``<sweep>/emc/`` as ordinary run folders. ``data.n_train`` is no member key of a
population, while width and seed are: every width at one n trains as one batched computation
(``sweep.engine=auto``), one population per size and width bucket.

Writes ``emc.csv`` (one row per point: the train error at each n, EMC's bracket and estimate);
the sweep report then adds the ``emc`` column to results.csv and curve.csv and draws
``<name>_emc.png`` (error against the swept key, parameters and EMC).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from regexp.analysis.emc import EMC, EPS, N_KEY, emc_from_errors, model_key
from regexp.errors import ConfigError

FOLDER = "emc"  # below the sweep folder


@dataclass
class EMCSettings:
    n_train: List[int] = field(default_factory=list)  # sizes below the sweep's own training set
    eps: float = EPS


def emc_settings(extra: Any, own_n: Optional[int]) -> Optional[EMCSettings]:
    """``extra.emc`` checked (None when absent); every size must be below the sweep's own ``own_n``."""
    node = extra.get("emc") if extra is not None else None
    if node is None:
        return None
    given = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for k in given:
        if k not in EMCSettings.__dataclass_fields__:
            raise ConfigError(f"extra.emc.{k} is unknown: expected one of {', '.join(EMCSettings.__dataclass_fields__)}")
    s = EMCSettings(**given)
    sizes = s.n_train
    if (not isinstance(sizes, list) or not sizes
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)):
        raise ConfigError(f"extra.emc.n_train={sizes!r} is invalid: expected a non-empty list of integers >= 1, "
                          "e.g. [250,500,1000,2000]")
    if own_n is not None and any(n >= own_n for n in sizes):
        raise ConfigError(f"extra.emc.n_train={sizes!r} is invalid: expected sizes below the sweep's own "
                          f"training set ({own_n}), whose runs give the error at n={own_n}")
    if isinstance(s.eps, bool) or not isinstance(s.eps, (int, float)) or not 0 <= s.eps < 1:
        raise ConfigError(f"extra.emc.eps={s.eps!r} is invalid: expected a train error in [0, 1)")
    s.n_train = sorted(set(sizes))
    return s


def emc_points(points: Sequence[Dict[str, Any]], sizes: Sequence[int]) -> List[Dict[str, Any]]:
    """Every sweep point at every smaller size; size first, so one size's models sit together."""
    return [{N_KEY: n, **p} for n in sizes for p in points]


def _mean_train_errors(pairs) -> Dict[str, Dict[int, float]]:
    """model key -> {n: mean train error over its completed seeds}."""
    acc: Dict[str, Dict[int, List[float]]] = {}
    for point, n, row in pairs:
        err = row.get("train_error")
        if row.get("status") != "completed" or err in ("", None):
            continue
        acc.setdefault(model_key(point), {}).setdefault(int(n), []).append(float(err))
    return {k: {n: sum(v) / len(v) for n, v in by_n.items()} for k, by_n in acc.items()}


def emc_table(points, rows, own_n: int, emc_pts, emc_rows, eps: float
              ) -> Tuple[Dict[str, EMC], Dict[str, Dict[int, float]]]:
    """EMC of each model, and its mean train errors by size, from its runs at every size (the
    sweep's own runs at ``own_n``)."""
    pairs = [(p, own_n, r) for p, r in zip(points, rows)]
    pairs += [(p, p[N_KEY], r) for p, r in zip(emc_pts, emc_rows)]
    errors = _mean_train_errors(pairs)
    return {k: emc_from_errors(e, eps) for k, e in errors.items()}, errors


def emc_rows(table: Dict[str, EMC], errors: Dict[str, Dict[int, float]]) -> List[Dict[str, Any]]:
    out = []
    for key, e in table.items():
        row: Dict[str, Any] = dict(json.loads(key))
        for n in sorted(errors[key]):
            row[f"train_error@{n}"] = errors[key][n]
        row.update({"emc": "" if e.value is None else e.value, "emc_upper": "" if e.upper is None else e.upper,
                    "emc_estimate": "" if e.estimate is None else e.estimate, "emc_censored": e.censored})
        out.append(row)
    return out


def plotted(e: EMC) -> Optional[float]:
    """Where a model sits on the EMC axis: the crossing of ε when the grid brackets it, else its
    lower bound (EMC ≥ the largest size, censored); None when even the smallest size fails."""
    return e.estimate if e.estimate is not None else (float(e.lower) if e.lower is not None else None)


def measure(cfg: DictConfig, points: List[Dict[str, Any]], rows: List[Dict[str, Any]], sweep_dir: Path,
            s: EMCSettings, own_n: int) -> Dict[str, Dict[str, Any]]:
    """Train the sweep's points at the smaller sizes and write ``emc.csv``; return model key ->
    {emc: where it is plotted (:func:`plotted`), censored: whether the sizes bracket it}."""
    from regexp.sweep import run_points, write_csv

    if any(N_KEY in p for p in points):
        raise ConfigError(f"extra.emc is invalid for a sweep over {N_KEY}: EMC varies the training-set size "
                          "itself; sweep the model (model.width ...) instead")
    pts = emc_points(points, s.n_train)
    more = run_points(cfg, pts, Path(sweep_dir) / FOLDER)
    table, errors = emc_table(points, rows, own_n, pts, more, s.eps)
    write_csv(emc_rows(table, errors), Path(sweep_dir) / "emc.csv")
    return {k: {"emc": plotted(e), "censored": e.censored} for k, e in table.items()}


def read_table(sweep_dir: Path) -> Optional[Dict[str, Dict[str, Any]]]:
    """``emc.csv`` of a finished sweep as model key -> {emc, censored} (None when it has none)."""
    from regexp.sweep import read_csv

    path = Path(sweep_dir) / "emc.csv"
    if not path.exists():
        return None
    from regexp.analysis.collect import parse_overrides

    out = {}
    for r in read_csv(path):
        keys = [k for k in r if not k.startswith(("train_error@", "emc"))]
        point = parse_overrides([f"{k}={r[k]}" for k in keys])
        est, low = r.get("emc_estimate", ""), r.get("emc", "")
        value = float(est) if est != "" else (float(low) if low != "" else None)
        out[model_key(point)] = {"emc": value, "censored": r.get("emc_censored") == "True"}
    return out
