"""What a run does, chosen by ``task`` (``train`` unless an experiment says otherwise).

``run_task`` is the one place that turns failures into exit statuses: bad input becomes a
single ``error:`` line and exit 2; a full disk one line naming the file and exit 1; any other
exception one line on the console, its traceback in the job's ``run.log``, ``status: failed``
and exit 1; a signal ``status: interrupted`` and exit 128 + N. Inside a multirun a failing
job does not stop the sweep: it records its failure and the sweep summary counts it. The run
holds its folder's lock throughout (:mod:`regexp.train.rundir`).
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.train import signals
from regexp.train.io import WriteFailed, write_json
from regexp.train.rundir import FolderBusy, RunLock, ledger_line, save_hydra_files
from regexp.train.signals import Interrupted

log = logging.getLogger("regexp")

TaskFn = Callable[[DictConfig, Path, List[str], bool], Dict[str, Any]]
TASKS: Dict[str, TaskFn] = {}
EXIT_CODES = {"completed": 0, "failed": 1, "diverged": 3}


def register_task(name: str):
    def deco(fn: TaskFn) -> TaskFn:
        TASKS[name] = fn
        return fn
    return deco


@register_task("train")
def _train(cfg, out_dir, overrides, sweep):
    from regexp.train.trainer import train

    return train(cfg, out_dir, overrides, sweep)


# Task "sweep" (grid sweeps with their CSV, plot and TensorBoard curve) lives in
# regexp/experiments/sweep_task.py, registered when run_task imports regexp.experiments.


def _record_failure(out_dir: Path, message: str, overrides: List[str]) -> None:
    metrics = out_dir / "metrics.json"
    if metrics.exists():  # never replace what an earlier, finished attempt wrote
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(metrics, {"status": "failed", "error": message, "overrides": overrides})
    except (OSError, WriteFailed):
        pass  # e.g. the disk is still full: the console line is the record


def _log_to_file(message: str) -> None:
    """Put ``message`` (a traceback) in the job's ``run.log`` only: the console gets one line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers + log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def run_task(cfg: DictConfig):
    import regexp.experiments  # noqa: F401  (registers the experiment tasks)

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    status = "failed"
    try:
        # The process-wide stop flag (installed here too: a parallel launcher's worker runs jobs
        # without importing regexp.run), held for the process's life so that a job started after
        # a SIGTERM stops at once; and this folder is ours for the whole run.
        signals.install()
        with RunLock(out_dir):
            if cfg.task not in TASKS:
                raise ConfigError(f"task={cfg.task!r} is unknown: expected one of {', '.join(TASKS)}")
            validate(cfg)
            if cfg.task != "train":  # train() writes these once it has accepted the folder
                save_hydra_files(out_dir, cfg)
            try:
                metrics = TASKS[cfg.task](cfg, out_dir, overrides, sweep)
            except Interrupted as e:  # a sweep stopped between points: its state says so
                metrics = {"status": "interrupted", "signal": e.signum, "task": cfg.task}
            if cfg.task != "train":  # train() writes its own; a sweep-like task's state goes here
                write_json(out_dir / "metrics.json", {**metrics, "overrides": overrides})
            status = metrics.get("status", "completed")
    except FolderBusy as e:  # another live run owns the folder: write nothing into it
        status = "refused"
        print(f"error: {e}", file=sys.stderr)
        if sweep:
            return None
        sys.exit(2)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if sweep:
            _record_failure(out_dir, str(e), overrides)
            return None
        sys.exit(2)
    except WriteFailed as e:  # disk full and the like: the message names the file
        print(f"error: {e}", file=sys.stderr)
        _record_failure(out_dir, str(e), overrides)
        if sweep:
            return None
        sys.exit(1)
    except Exception as e:  # a bug or an environment problem: keep the traceback in the job log
        _log_to_file(f"job failed:\n{traceback.format_exc()}")
        print(f"error: {type(e).__name__}: {e} (traceback in {out_dir / 'run.log'})", file=sys.stderr)
        _record_failure(out_dir, f"{type(e).__name__}: {e}", overrides)
        if sweep:
            return None
        sys.exit(1)
    finally:
        ledger_line(out_dir, status)
    if metrics.get("skipped"):
        print(f"skipped: {out_dir} already holds a {status} run")
    _report(metrics, out_dir)
    if status == "interrupted" and not sweep:
        sys.exit(128 + int(metrics.get("signal", 15)))
    if status != "completed" and not sweep:
        sys.exit(EXIT_CODES.get(status, 1))
    return metrics


def _report(metrics: Dict[str, Any], out_dir: Path) -> None:
    final, best = metrics.get("final") or {}, metrics.get("best") or {}
    parts = [f"status={metrics.get('status')}"]
    parts += [f"{k}={metrics[k]}" for k in ("epochs", "points", "failed") if k in metrics]
    for key in ("train_acc", "val_acc", "test_acc"):
        if key in final:
            parts.append(f"{key}={final[key]:.4f}")
    if "val_acc" in best:
        parts.append(f"best_epoch={best['epoch']} best_val_acc={best['val_acc']:.4f}")
    print(" ".join(parts))
    print(out_dir)
