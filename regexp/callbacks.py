"""Hydra callbacks: the end-of-sweep summary."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_statuses(sweep_dir: Path) -> Counter:
    counts: Counter = Counter()
    for m in sorted(Path(sweep_dir).rglob("metrics.json")):
        try:
            counts[json.loads(m.read_text()).get("status", "unknown")] += 1
        except (OSError, ValueError):
            counts["unreadable"] += 1
    return counts


class SweepSummary(Callback):
    """Print how many jobs of a multirun completed, diverged or failed; exit 1 if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        counts = sweep_statuses(sweep_dir)
        total = sum(counts.values())
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"sweep: {total} jobs ({detail or 'none'})")
        print(sweep_dir)
        if counts.get("failed") or counts.get("unreadable"):
            sys.stdout.flush()
            raise SystemExit(1)
