"""Where a gallery experiment's outputs go: figures as PNG and TensorBoard images, tables as CSV.

Every figure is written twice on purpose: the PNG is what a student opens or pastes into a
report, the TensorBoard image sits beside the runs' curves under ``tensorboard --logdir``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # no display on the machines that run sweeps

import matplotlib.pyplot as plt  # noqa: E402

from regexp.sweep import write_csv  # noqa: E402


class Outputs:
    """PNG files, one TensorBoard event file and CSV tables below one run directory."""

    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tensorboard = tensorboard
        self._writer = None

    def _tb(self):
        if self._tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir))
        return self._writer

    def figure(self, name: str, fig) -> Path:
        """Save ``fig`` as ``<name>.png`` and as the TensorBoard image ``figures/<name>``; close it."""
        path = self.out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        writer = self._tb()
        if writer is not None:
            writer.add_figure(f"figures/{name}", fig, 0, close=False)
        plt.close(fig)
        return path

    def table(self, name: str, rows: List[Dict[str, Any]]) -> Path:
        path = self.out_dir / f"{name}.csv"
        write_csv(rows, path)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def subplots(n: int, cols: Optional[int] = None, size: float = 3.6, **kw):
    """A row-major grid of ``n`` axes (extra cells hidden), returned as a flat list."""
    cols = cols or min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * 0.85 * rows), squeeze=False, **kw)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]
