"""Task ``sweep``: train the grid ``sweep.params`` × ``sweep.seeds`` in-process, then report it.

Each point is an ordinary run folder below the sweep folder (see :mod:`regexp.sweep`); the
report (:mod:`regexp.analysis.report`) then writes ``results.csv``, ``curve.csv``, the plot
named by ``extra.plot.name`` and the sweep-level TensorBoard run. The double-descent
experiments (``configs/experiment/double_descent*.yaml``) are this task with their own grids.

``sweep.x: epoch`` plots each run's history against the epoch instead of a swept key
(epoch-wise double descent); then ``sweep.params`` may be empty (one run per seed).

``extra.emc: {n_train: [250,500,1000,2000], eps: 0.1}`` also measures each swept model's effective
model complexity (:mod:`regexp.experiments._emc`): ``emc.csv``, an ``emc`` column in results.csv
and curve.csv, and ``<name>_emc.png`` with EMC as an x axis beside the swept key and parameters.

``sweep.shards=N`` spreads the grid over the N jobs of a multirun (``-m sweep.shard=0,..,N-1``,
any launcher: submitit SLURM, submitit_local, joblib): job ``sweep.shard=i`` trains the points
``i, i+N, i+2N, ...`` of the grid (round-robin) into ``<hydra.sweep.dir>/points/``, where every
shard's points sit together; its own job folder keeps only its ``metrics.json`` (how many points
were its share, how many of the grid are done). The shard that finds every point finished (the
last to end) writes ``results.csv``, ``curve.csv``, the plot and the TensorBoard curve there;
``scripts/plot_sweep.py <hydra.sweep.dir>/points`` rebuilds them at any time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from regexp.errors import ConfigError
from regexp.sweep import grid, point_config, point_name, run_points
from regexp.tasks import register_task

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


def shard_points(points: List[Dict[str, Any]], shard: int, shards: int) -> List[Dict[str, Any]]:
    """The points shard ``shard`` of ``shards`` trains: every ``shards``-th point from the
    ``shard``-th, in grid order (round-robin, so each shard gets small and large models alike)."""
    return [p for i, p in enumerate(points) if i % shards == shard]


def _shared_dir(out_dir: Path, sweep: bool, shards: int) -> Path:
    """Where the points of a sharded sweep meet: ``<hydra.sweep.dir>/points``, no job's own folder."""
    if not sweep:
        raise ConfigError(f"sweep.shards={shards} needs a multirun, whose jobs share hydra.sweep.dir: "
                          f"e.g. -m sweep.shard={','.join(map(str, range(shards)))} sweep.shards={shards}")
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    base = Path(hc.sweep.dir)
    if not base.is_absolute():
        base = Path(hc.runtime.cwd) / base
    shared = base / "points"
    if shared.resolve() == out_dir.resolve() or shared.resolve() in out_dir.resolve().parents:
        raise ConfigError(f"hydra.sweep.subdir puts this job's folder {out_dir} at the shared points "
                          f"folder {shared}: expected a job folder next to it")
    return shared


def _finished(metrics: Optional[Dict[str, Any]]) -> bool:
    """A point has its final result (completed, diverged, failed), so no shard will train it again."""
    return metrics is not None and metrics.get("status") not in ("interrupted", "running")


def _runs(cfg: DictConfig, points: List[Dict[str, Any]], folder: Path, rows, found: Dict[Path, Dict[str, Any]]):
    """Each point's run as its folder holds it (``found``: :func:`regexp.analysis.collect.run_metrics`)."""
    from regexp.analysis.collect import Run, train_size

    runs = []
    for i, point in enumerate(points):
        run_dir = folder / point_name(point)
        metrics = found.get(run_dir)
        if metrics is None:  # the point never wrote metrics.json
            status = rows[i].get("status", "failed") if rows else "failed"
            metrics = {"status": status, "error": "no metrics.json"}
        runs.append(Run(run_dir, point, metrics, train_size(point_config(cfg, point).data)))
    return runs


@register_task("sweep")
def run_sweep(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict[str, Any]:
    # Imported here: every `python -m regexp.run` imports this module, only sweeps need matplotlib.
    from regexp.analysis.collect import run_metrics, train_size
    from regexp.analysis.report import format_curve, plot_settings, report
    from regexp.experiments._emc import emc_settings
    from regexp.experiments._emc import measure as measure_emc

    settings = plot_settings(cfg.extra)
    x = sweep_axis(cfg)
    params = OmegaConf.to_container(cfg.sweep.params, resolve=True)
    _check_values(params)
    seeds = list(cfg.sweep.seeds)
    if not seeds:
        raise ConfigError("sweep.seeds=[] is invalid: expected a non-empty list of seeds")
    points = grid(params, seeds)
    point_config(cfg, points[0])  # a misspelt key fails here, once, instead of at every point
    keys = list(params) + ["seed"]
    shard, shards = int(cfg.sweep.get("shard", 0)), int(cfg.sweep.get("shards", 1))
    own_n = train_size(cfg.data)
    emc_cfg = emc_settings(cfg.extra, own_n)
    if emc_cfg is not None and (shards != 1 or x == EPOCH or own_n is None):
        raise ConfigError("extra.emc is invalid here: it needs an unsharded sweep (sweep.shards=1) over a model "
                          "key (not sweep.x=epoch) on a data set of known size")
    if shards == 1:
        rows = run_points(cfg, points, out_dir)
        emc = measure_emc(cfg, points, rows, out_dir, emc_cfg, own_n) if emc_cfg is not None else None
        runs = _runs(cfg, points, out_dir, rows, run_metrics(out_dir))
        curve = report(out_dir, runs, x, settings, keys=keys, emc=emc)
        print(format_curve(curve, invert_x=settings.invert_x))
        failed = sum(r.status == "failed" for r in runs)
        return {"status": "failed" if failed else "completed", "epochs": cfg.trainer.epochs,
                "points": len(runs), "failed": failed, **_engine(cfg, points)}

    # A shard: train this job's share into the shared folder; the shard that finds the whole
    # grid finished (the last one to end) writes the report over every shard's points.
    shared = _shared_dir(out_dir, sweep, shards)
    shared.mkdir(parents=True, exist_ok=True)
    mine = shard_points(points, shard, shards)
    rows = run_points(cfg, mine, shared) if mine else []
    found = run_metrics(shared)
    own = _runs(cfg, mine, shared, rows, found)
    done = sum(_finished(found.get(shared / point_name(p))) for p in points)
    print(f"shard {shard}/{shards}: {len(mine)} of the grid's {len(points)} points are this shard's; "
          f"{done} of {len(points)} points done")
    complete = done == len(points)
    if complete:
        curve = report(shared, _runs(cfg, points, shared, None, found), x, settings, keys=keys)
        print(format_curve(curve, invert_x=settings.invert_x))
        print(f"report of all {shards} shards: {shared / 'results.csv'}")
    else:
        print(f"the last shard to finish writes the report: {shared / 'results.csv'}")
    failed = sum(r.status == "failed" for r in own)
    return {"status": "failed" if failed else "completed", "epochs": cfg.trainer.epochs,
            "points": len(own), "failed": failed, "shard": shard, "shards": shards,
            "grid": len(points), "done": done, "report": complete, "points_dir": str(shared),
            "share": [point_name(p) for p in mine], **_engine(cfg, mine)}


def _engine(cfg: DictConfig, points: List[Dict[str, Any]]) -> Dict[str, Any]:
    """How the points were trained, for the sweep's metrics.json: ``engine`` (population or
    serial) and, when serial, ``engine_reason`` (what kept them out of a population)."""
    from regexp.population.run import choose_engine

    engine, why = choose_engine(cfg, points)
    return {"engine": engine} if why is None else {"engine": engine, "engine_reason": why}
