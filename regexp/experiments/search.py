"""Task ``search``: a hyperparameter search with Optuna (TPE, random or grid) below one folder.

Settings live under ``extra.search`` (see ``configs/experiment/search.yaml``)::

    space:                # dotted config key -> its distribution (nested keys work too)
      optimizer.lr: {type: float, low: 1e-4, high: 1e-1, log: true}
      model.width: {type: int, low: 8, high: 128}          # optional step (or log)
      model.activation: {type: categorical, choices: [relu, tanh]}
    n_trials: 20          # trials in the study in all; relaunching with more adds the difference
    sampler: tpe          # tpe | random | grid (grid: int and categorical keys only)
    metric: val_acc       # a per-epoch history key: {train,val,test}_{acc,loss}
    direction: null       # maximize | minimize; default: maximize *_acc, minimize *_loss
    value: best           # best: the best epoch's metric; final: the last epoch's
    pruner: median        # median | threshold | none, on the per-epoch metric
    threshold: null       # pruner=threshold: prune a trial whose metric is worse than this
    warmup: 1             # epochs a trial always trains before it may be pruned
    startup_trials: 5     # median pruner and TPE: trials before they act
    parallel: 1           # trials asked at once; population-compatible ones train together
    seed: null            # the sampler's seed (default: the config's seed)

Only keys that exist in the config can be searched; a config *group* (``optimizer=sgd``)
cannot be switched in-process, so a categorical key chooses among values of one leaf key.

The study is ``<folder>/study.db`` (SQLite), so relaunching the same command continues it: a
trial left running by an interrupted launch is retried in the same run folder (it goes on
from its checkpoint). Each trial is an ordinary run folder named by its values (as a sweep
point's); two trials with the same values share it. After the trials: ``trials.csv``,
``best.json`` (the best trial's value, values and folder), ``best_config.yaml`` (its whole
config) and one line ``best: ...`` on the console.

Pruning stops a serially trained trial after an epoch whose metric the pruner rejects; its
folder's ``metrics.json`` then says ``status: pruned``. It uses ``train()``'s per-epoch
hook (``train(..., on_epoch=fn)``), called at each evaluated epoch's end; trials trained
together as a population (``parallel``) are never pruned (their epochs are reported to the study
afterwards, for the pruner's statistics).
"""
from __future__ import annotations

import copy
import logging
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from regexp.errors import ConfigError
from regexp.sweep import checked_config, point_config, point_job, point_name, write_csv
from regexp.tasks import register_task
from regexp.train import signals

log = logging.getLogger("regexp.search")

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "threshold", "none")
DIRECTIONS = ("maximize", "minimize")
TYPES = ("float", "int", "categorical")
VALUES = ("best", "final")
METRICS = tuple(f"{s}_{m}" for s in ("train", "val", "test") for m in ("acc", "loss"))
KEYS = ("space", "n_trials", "sampler", "metric", "direction", "value", "pruner", "threshold", "warmup",
        "startup_trials", "parallel", "seed")
STUDY = "search"
P = "extra.search"


@dataclass
class Settings:
    space: Dict[str, Dict[str, Any]]
    n_trials: int
    sampler: str
    metric: str
    direction: str
    value: str
    pruner: str
    threshold: Optional[float]
    warmup: int
    startup_trials: int
    parallel: int
    seed: int


def _int(s: Dict[str, Any], key: str, default: int, low: int) -> int:
    v = s.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{P}.{key}={v!r} is invalid: expected an integer >= {low}")
    return v


def _choice(s: Dict[str, Any], key: str, default: str, valid) -> str:
    v = s.get(key, default)
    if v not in valid:
        raise ConfigError(f"{P}.{key}={v!r} is invalid: expected one of {', '.join(valid)}")
    return v


def _flatten(space: Any, prefix: str = "") -> Dict[str, Any]:
    """``{optimizer: {lr: {type: ...}}}`` and ``{optimizer.lr: {type: ...}}`` alike."""
    out: Dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "type" not in v:
            if not v:
                raise ConfigError(f"{P}.space.{key}={{}} is invalid: expected a distribution "
                                  "such as {type: float, low: 0.001, high: 0.1, log: true}")
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_dimension(cfg: DictConfig, key: str, d: Any, sampler: str) -> None:
    where = f"{P}.space.{key}"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}={d!r} is invalid: expected a distribution such as "
                          "{type: float, low: 0.001, high: 0.1, log: true}")
    current = OmegaConf.select(cfg, key, default="__missing__")
    if current == "__missing__":
        raise ConfigError(f"{where} is invalid: {key!r} is not a key of the config")
    if isinstance(current, DictConfig):
        raise ConfigError(f"{where} is invalid: {key!r} is a config group or section; search one of its "
                          "values (e.g. optimizer.lr), groups cannot be switched in-process")
    kind = d.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}.type={kind!r} is invalid: expected one of {', '.join(TYPES)}")
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}[kind]
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is invalid for type {kind}: expected only "
                          f"{', '.join(sorted(allowed))}")
    if kind == "categorical":
        choices = d.get("choices")
        if not isinstance(choices, list) or not choices or \
                not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(f"{where}.choices={choices!r} is invalid: expected a non-empty list of "
                              "numbers, strings, booleans or null")
        return
    low, high, log_, step = d.get("low"), d.get("high"), d.get("log", False), d.get("step")
    integer = kind == "int"
    ok = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if integer else _number
    what = "integers" if integer else "numbers"
    if not (ok(low) and ok(high) and low <= high):
        raise ConfigError(f"{where}: low={low!r}, high={high!r} are invalid: expected {what} with low <= high")
    if not isinstance(log_, bool):
        raise ConfigError(f"{where}.log={log_!r} is invalid: expected true or false")
    if log_ and low <= 0:
        raise ConfigError(f"{where}.low={low!r} is invalid with log: true: expected low > 0")
    if step is not None and (not ok(step) or step <= 0 or log_):
        raise ConfigError(f"{where}.step={step!r} is invalid: expected a positive {what[:-1]}, "
                          "and no step with log: true")
    if sampler == "grid" and not integer:
        raise ConfigError(f"{where}.type=float is invalid with {P}.sampler=grid: expected int or "
                          "categorical (list the values as choices)")
    if sampler == "grid" and log_:
        raise ConfigError(f"{where}.log=true is invalid with {P}.sampler=grid: expected a linear int "
                          "range or categorical choices")


def settings(cfg: DictConfig) -> Settings:
    """``extra.search``, checked: a bad setting raises one ConfigError naming its key."""
    raw = cfg.extra.get("search") if cfg.get("extra") is not None else None
    if raw is None:
        raise ConfigError(f"{P} is missing: task=search needs {P}.space, e.g. "
                          f"'+{P}.space={{optimizer.lr:{{type:float,low:1e-4,high:0.1,log:true}}}}'")
    s = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw
    if not isinstance(s, dict):
        raise ConfigError(f"{P}={s!r} is invalid: expected a mapping with at least 'space'")
    unknown = sorted(set(s) - set(KEYS))
    if unknown:
        raise ConfigError(f"{P}.{unknown[0]} is unknown: expected one of {', '.join(KEYS)}")
    sampler = _choice(s, "sampler", "tpe", SAMPLERS)
    space = s.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{P}.space={space!r} is invalid: expected a non-empty mapping of config keys to "
                          "distributions, e.g. {optimizer.lr: {type: float, low: 1e-4, high: 0.1, log: true}}")
    space = _flatten(space)
    for key, d in space.items():
        _check_dimension(cfg, key, d, sampler)
    metric = _choice(s, "metric", "val_acc", METRICS)
    if metric.startswith("val_") and not cfg.data.get("val_fraction", 1):
        raise ConfigError(f"{P}.metric={metric} is invalid with data.val_fraction=0: expected a "
                          "validation split (data.val_fraction > 0) or a train_/test_ metric")
    direction = s.get("direction") or ("maximize" if metric.endswith("_acc") else "minimize")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{P}.direction={direction!r} is invalid: expected one of {', '.join(DIRECTIONS)}")
    pruner = _choice(s, "pruner", "median", PRUNERS)
    threshold = s.get("threshold")
    if pruner == "threshold" and not _number(threshold):
        raise ConfigError(f"{P}.threshold={threshold!r} is invalid with {P}.pruner=threshold: expected a number "
                          f"(a trial whose {metric} is worse than it is pruned)")
    seed = s.get("seed")
    if seed is None:
        seed = int(cfg.seed)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{P}.seed={seed!r} is invalid: expected an integer or null")
    n_trials = _int(s, "n_trials", 10, 1)
    if sampler == "grid":
        n_trials = min(n_trials, _grid_size(space))
    return Settings(space=space, n_trials=n_trials, sampler=sampler, metric=metric, direction=direction,
                    value=_choice(s, "value", "best", VALUES), pruner=pruner, threshold=threshold,
                    warmup=_int(s, "warmup", 1, 0), startup_trials=_int(s, "startup_trials", 5, 0),
                    parallel=_int(s, "parallel", 1, 1), seed=seed)


def _grid_values(d: Dict[str, Any]) -> List[Any]:
    if d["type"] == "categorical":
        return list(d["choices"])
    return list(range(d["low"], d["high"] + 1, d.get("step") or 1))


def _grid_size(space: Dict[str, Dict[str, Any]]) -> int:
    n = 1
    for d in space.values():
        n *= len(_grid_values(d))
    return n


def _distributions(space: Dict[str, Dict[str, Any]]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, d in space.items():
        if d["type"] == "categorical":
            out[key] = CategoricalDistribution(d["choices"])
        elif d["type"] == "int":
            out[key] = IntDistribution(d["low"], d["high"], log=d.get("log", False), step=d.get("step") or 1)
        else:
            out[key] = FloatDistribution(float(d["low"]), float(d["high"]), log=d.get("log", False),
                                         step=d.get("step"))
    return out


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, less its ``after_trial``, which only calls ``study.stop()`` once the
        grid is done; that raises outside ``study.optimize`` (this task asks and tells, and stops by
        n_trials, capped at the grid's size)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler


def _GridSampler(search_space, seed):
    return _grid_sampler_class()(search_space, seed=seed)


def _study(st: Settings, out_dir: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    # A relaunch seeds a TPE or random sampler past the trials already drawn: the same seed would
    # draw the first launch's values again (the random start-up trials in particular). Not the
    # grid sampler: its seed orders the grid, and the stored trials name grid points by position.
    try:
        seed = st.seed + len(optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False))
    except KeyError:  # a new study
        seed = st.seed
    if st.sampler == "grid":
        sampler = _GridSampler({k: _grid_values(d) for k, d in st.space.items()}, seed=st.seed)
    elif st.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=st.startup_trials,
                                             constant_liar=st.parallel > 1)
    if st.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=st.startup_trials, n_warmup_steps=st.warmup)
    elif st.pruner == "threshold":
        bound = {"lower" if st.direction == "maximize" else "upper": float(st.threshold)}
        pruner = optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=st.warmup)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=STUDY,
                                direction=st.direction, load_if_exists=True)
    if study.direction.name.lower() != st.direction:
        raise ConfigError(f"{P}.direction={st.direction} is invalid for {out_dir / 'study.db'}: that study "
                          f"{study.direction.name.lower()}s; keep its direction or search into another folder")
    return study


def _stale(study, st: Settings) -> list:
    """Trials left running by an interrupted launch (this folder is locked: nobody runs them), to
    be trained again in their folders (each goes on from its checkpoint); one whose values do not
    cover the current space is closed as failed."""
    import optuna
    from optuna.trial import TrialState

    out = []
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if set(st.space) <= set(ft.params):
            # Trial(study, id) is how Optuna itself reopens a stored trial (id: FrozenTrial._trial_id)
            out.append((optuna.trial.Trial(study, ft._trial_id), set(ft.intermediate_values)))
            log.info("trial %d was interrupted: it goes on", ft.number)
        else:
            study.tell(ft.number, state=TrialState.FAIL)
    return out


def _done(study) -> int:
    """Finished trials (complete, pruned or failed)."""
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _objective(st: Settings, metrics: Dict[str, Any]) -> Optional[float]:
    values = [r[st.metric] for r in metrics.get("history") or [] if st.metric in r]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return None
    if st.value == "final":
        return values[-1]
    return max(values) if st.direction == "maximize" else min(values)


def _report_history(trial, st: Settings, metrics: Dict[str, Any], reported: set) -> None:
    for row in metrics.get("history") or []:
        if st.metric in row and row["epoch"] not in reported and math.isfinite(row[st.metric]):
            trial.report(float(row[st.metric]), int(row["epoch"]))
            reported.add(row["epoch"])


def _train_one(base: DictConfig, st: Settings, trial, point: Dict[str, Any], out_dir: Path,
               reported: set, prune: bool) -> Dict[str, Any]:
    """One trial, trained alone; with ``prune``, the pruner sees each epoch's row and may stop it."""
    from regexp.train.io import write_json
    from regexp.train.trainer import train

    out, overrides = point_job(point, out_dir)

    def on_epoch(row: Dict[str, float]) -> bool:
        if st.metric not in row or not math.isfinite(row[st.metric]):
            return False
        trial.report(float(row[st.metric]), int(row["epoch"]))
        reported.add(row["epoch"])
        return trial.should_prune()

    try:
        kwargs = {"on_epoch": on_epoch} if prune else {}
        return train(checked_config(base, point), out, overrides, sweep=True, **kwargs)
    except Exception as e:  # recorded in the trial's folder and the study; the search goes on
        msg = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        log.error("trial %d (%s) failed: %s\n%s", trial.number, point_name(point), msg, traceback.format_exc())
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "metrics.json").exists():
            write_json(out / "metrics.json", {"status": "failed", "error": msg, "overrides": overrides})
        return {"status": "failed", "error": msg}


def _tell(study, st: Settings, trial, metrics: Dict[str, Any], reported: set):
    """Close ``trial`` by its run's outcome: (outcome, value); outcome None when the run was
    interrupted (the trial stays running and the next launch retries it)."""
    from optuna.trial import TrialState

    status = metrics.get("status", "failed")
    if status == "interrupted":
        return None, None
    if status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned", None
    value = _objective(st, metrics) if status == "completed" else None
    if value is None:
        study.tell(trial, state=TrialState.FAIL)
        return (status if status != "completed" else "failed"), None
    _report_history(trial, st, metrics, reported)  # for the pruner's statistics (populations, skips)
    study.tell(trial, value)
    return "completed", value


def _batch(base: DictConfig, st: Settings, study, batch: list, out_dir: Path, prune: bool) -> List[str]:
    """Train ``batch`` [(trial, epochs it already reported)] and close each trial."""
    from regexp.population import train_population, use_population

    trials, reported = [t for t, _ in batch], [r for _, r in batch]
    points = [{k: t.params[k] for k in st.space} for t in trials]
    if len(points) > 1 and use_population(base, points):
        unique = {point_name(p): p for p in points}  # two trials with the same values share a run
        trained = dict(zip(unique, train_population(base, list(unique.values()), out_dir)))
        results = [trained[point_name(p)] for p in points]
    else:
        results = []
        for t, p, rep in zip(trials, points, reported):
            signals.check()  # once asked to stop, start no new trial
            results.append(_train_one(base, st, t, p, out_dir, rep, prune))
    outcomes = []
    for t, p, m, rep in zip(trials, points, results, reported):
        outcome, value = _tell(study, st, t, m, rep)
        outcomes.append(outcome)
        shown = "" if value is None else f" {st.metric}={value:.4f}"
        log.info("trial %d %s: %s%s", t.number, point_name(p), outcome or "interrupted", shown)
    signals.check()  # a trial was interrupted: the search stops here too
    return outcomes


def _write_results(base: DictConfig, st: Settings, study, out_dir: Path) -> Dict[str, Any]:
    from optuna.trial import TrialState

    from regexp.train.io import write_json

    rows = []
    for t in study.get_trials(deepcopy=False):
        folder = point_job({k: t.params[k] for k in st.space}, out_dir)[0] if set(st.space) <= set(t.params) else None
        row: Dict[str, Any] = {"trial": t.number, "state": t.state.name.lower(),
                               "value": t.value if t.value is not None else ""}
        row.update({k: t.params.get(k, "") for k in st.space})
        row["last_epoch"] = t.last_step if t.last_step is not None else ""
        row["folder"] = folder.name if folder is not None else ""
        rows.append(row)
    if rows:
        write_csv(rows, out_dir / "trials.csv")
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if set(st.space) <= set(t.params)]
    if not complete:
        best = {"metric": st.metric, "direction": st.direction, "value": None, "trial": None, "params": None,
                "folder": None}
        write_json(out_dir / "best.json", best)
        print(f"best: none ({st.metric}): no trial completed")
        return best
    pick = max if st.direction == "maximize" else min
    bt = pick(complete, key=lambda t: t.value)
    point = {k: bt.params[k] for k in st.space}
    folder = point_job(point, out_dir)[0]
    cfg = point_config(base, point)
    OmegaConf.save(cfg, out_dir / "best_config.yaml")
    best = {"metric": st.metric, "direction": st.direction, "value": bt.value, "trial": bt.number,
            "params": point, "folder": str(folder), "overrides": point_job(point, out_dir)[1]}
    write_json(out_dir / "best.json", best)
    print(f"best: trial={bt.number} {st.metric}={bt.value:.4f} {' '.join(best['overrides'])} ({folder})")
    return best


def trial_base(cfg: DictConfig) -> DictConfig:
    """The config trials start from: ``cfg`` without ``extra.search``, so that a trial's run (and
    whether a relaunch may skip it) does not depend on settings such as n_trials."""
    base = copy.deepcopy(cfg)
    with open_dict(base):
        base.extra.pop("search", None)
    return base


@register_task("search")
def run_search(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict[str, Any]:
    st = settings(cfg)
    cfg = trial_base(cfg)
    for key, d in st.space.items():  # every choice and both bounds must make a valid run
        for value in (d["choices"] if d["type"] == "categorical" else (d["low"], d["high"])):
            try:
                checked_config(cfg, {key: value})
            except ConfigError as e:
                raise ConfigError(f"{P}.space.{key} is invalid: {e}") from None
    prune = st.pruner != "none"
    out_dir.mkdir(parents=True, exist_ok=True)
    study = _study(st, out_dir)
    stale = _stale(study, st)
    dists = _distributions(st.space)
    outcomes: List[str] = []
    while True:
        signals.check()
        batch, stale = stale[:st.parallel], stale[st.parallel:]  # interrupted trials first
        new = min(st.parallel - len(batch), st.n_trials - _done(study) - len(batch) - len(stale))
        batch += [(study.ask(dists), set()) for _ in range(max(new, 0))]
        if not batch:
            break
        outcomes += _batch(cfg, st, study, batch, out_dir, prune)
    best = _write_results(cfg, st, study, out_dir)
    trials = study.get_trials(deepcopy=False)
    failed = sum(o == "failed" for o in outcomes)
    from optuna.trial import TrialState

    return {"status": "failed" if failed else "completed", "epochs": cfg.trainer.epochs,
            "points": _done(study), "failed": failed, "trained": len(outcomes),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "best_value": best["value"], "best_trial": best["trial"]}
