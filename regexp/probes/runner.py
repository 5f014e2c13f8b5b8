"""The probes of one run, as the trainer uses them: when to measure, on what, with which generator.

The probe batch is drawn once, from the run's seed by a generator of its own, so every
measurement of a run (and of runs that differ only in their training) sees the same examples.
The probes' random numbers come from another generator of their own whose state a checkpoint
carries, so a resumed run measures as an uninterrupted one would.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from regexp.probes.base import PROBES, Probe, ProbeInputs

# Offsets of the probes' generators from the run's seed: apart from the data-order generator
# (seeded with the seed itself), so probe draws are not the data order's.
BATCH_STREAM, DRAW_STREAM = 1_000_003, 2_000_003


def active(cfg) -> List[str]:
    """The probes ``cfg.probe`` turns on, in the registry's order."""
    return [name for name in PROBES if cfg.get(name) is not None]


def probe_batch(x_train: torch.Tensor, y_train: torch.Tensor, seed: int, size: int):
    """``size`` training examples (all when there are fewer), drawn from ``seed`` by a generator
    of their own and kept in the training set's order: the same for every run with that seed
    and data, whatever it trained with."""
    n = len(y_train)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + BATCH_STREAM))
    idx = pick[:min(size, n)].sort().values.to(x_train.device)
    return x_train[idx], y_train[idx]


def save_figure(fig, path: Path, tb, tag: str, step: int) -> Path:
    """Write a matplotlib figure to ``path`` and as the TensorBoard image ``tag``, and close it."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    # drawn once for both (savefig and add_figure would each render it: most of the end-of-run
    # probe time of a small model)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    tb.png(tag, buf.getvalue(), *rgb.shape[:2], step)
    return path


class Probes:
    def __init__(self, cfg, x_train: torch.Tensor, y_train: torch.Tensor, seed: int, eval_batch_size: int):
        self.every = int(cfg.every)
        self.probes: List[Probe] = [PROBES[name](cfg[name]) for name in active(cfg)]
        self.x, self.y = probe_batch(x_train, y_train, seed, int(cfg.batch_size))
        self.x_train, self.y_train, self.eval_batch_size = x_train, y_train, eval_batch_size
        self.generator = torch.Generator().manual_seed(seed + DRAW_STREAM)

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` is a periodic probe epoch (the end of the run is probed anyway)."""
        return self.every > 0 and epoch % self.every == 0

    def measure(self, model: nn.Module) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            inputs = ProbeInputs(model, [p for p in model.parameters() if p.requires_grad], self.x, self.y,
                                 self.x_train, self.y_train, self.eval_batch_size)
            out: Dict[str, float] = {}
            for p in self.probes:
                out.update(p.measure(inputs, self.generator))
            return out
        finally:
            model.train(was_training)

    def save_figures(self, out_dir: Path, tb, epoch: int) -> List[Path]:
        """Each probe's figures of its last measurement: ``<name>.png`` and the TensorBoard
        image ``probe/<name>``."""
        paths = []
        for p in self.probes:
            for name, fig in p.figures(epoch).items():
                paths.append(save_figure(fig, Path(out_dir) / f"{name}.png", tb, f"probe/{name}", epoch))
        return paths

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def build_probes(cfg, x_train: torch.Tensor, y_train: torch.Tensor, seed: int,
                 eval_batch_size: int) -> Optional[Probes]:
    """None when no probe is on (``probe=[]``, the default)."""
    return Probes(cfg, x_train, y_train, seed, eval_batch_size) if active(cfg) else None


def tags(values: Dict[str, float]) -> Dict[str, float]:
    """TensorBoard tags of measured values: ``probe/<key>``."""
    return {f"probe/{k}": v for k, v in values.items()}
