"""What a run does, chosen by ``task`` (``train`` unless an experiment says otherwise).

``run_task`` is the one place that turns failures into exit statuses: bad input becomes a
single ``error:`` line and exit 2; any other exception is logged with its traceback in the
job's log, recorded as ``status: failed`` and exits 1. Inside a multirun a failing job does
not stop the sweep: it records its failure and the sweep summary counts it.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.train.io import write_json

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


def auto_threads(cfg: DictConfig) -> None:
    """Give each parallel job its share of the cores: oversubscribed jobs run ~4x slower."""
    if cfg.trainer.threads is not None:
        return
    launcher = HydraConfig.get().launcher
    jobs = launcher.get("n_jobs") or launcher.get("tasks_per_node") or 1
    if jobs and jobs > 1 and launcher.get("cpus_per_task") is None:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(jobs)))


def _record_failure(out_dir: Path, message: str, overrides: List[str]) -> None:
    metrics = out_dir / "metrics.json"
    if metrics.exists():  # never replace what an earlier, finished attempt wrote
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(metrics, {"status": "failed", "error": message, "overrides": overrides})


def run_task(cfg: DictConfig):
    import regexp.experiments  # noqa: F401  (registers the experiment tasks)

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    try:
        if cfg.task not in TASKS:
            raise ConfigError(f"task={cfg.task!r} is unknown: expected one of {', '.join(TASKS)}")
        validate(cfg)
        auto_threads(cfg)
        metrics = TASKS[cfg.task](cfg, out_dir, overrides, sweep)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if sweep:
            _record_failure(out_dir, str(e), overrides)
            return None
        sys.exit(2)
    except Exception as e:  # a bug or an environment problem: keep the traceback in the job log
        log.error("job failed:\n%s", traceback.format_exc())
        print(f"error: {type(e).__name__}: {e} (traceback in {out_dir})", file=sys.stderr)
        _record_failure(out_dir, f"{type(e).__name__}: {e}", overrides)
        if sweep:
            return None
        sys.exit(1)
    status = metrics.get("status", "completed")
    if metrics.get("skipped"):
        print(f"skipped: {out_dir} already holds a {status} run")
    _report(metrics, out_dir)
    if status == "interrupted":
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
