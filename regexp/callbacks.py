"""Hydra callbacks: the end-of-sweep summary."""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from regexp.train import signals
from regexp.train.rundir import LEDGER_ENV, read_ledger


class SweepSummary(Callback):
    """Print how many jobs of this launch completed, diverged or failed; exit 1 if any failed,
    128 + signum if the launch was stopped by a signal (so SLURM and shells see it)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Every job appends its status to this launch's ledger (see regexp.train.rundir): a
        # relaunch into a folder holding earlier jobs counts only its own.
        folder = Path(config.hydra.sweep.dir)
        folder.mkdir(parents=True, exist_ok=True)
        ledger = folder / f".launch-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        ledger.touch()
        os.environ[LEDGER_ENV] = str(ledger)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        ledger = os.environ.pop(LEDGER_ENV, None)
        counts = Counter(read_ledger(Path(ledger)).values()) if ledger else Counter()
        total = sum(counts.values())
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"sweep: {total} jobs ({detail or 'none'})")
        print(sweep_dir)
        sys.stdout.flush()
        signum = signals.requested()
        if signum is not None:
            raise SystemExit(128 + signum)
        if counts.get("failed") or counts.get("refused"):
            raise SystemExit(1)
