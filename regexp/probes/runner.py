"""The probes of one run, as the trainer uses them: when to measure, on what, with which generator.

The probe batch is drawn once, from the run's seed by a generator of its own, so every
measurement of a run (and of runs that differ only in their training) sees the same examples.
The probes' random numbers come from another generator of their own whose state a checkpoint
carries, so a resumed run measures as an uninterrupted one would.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

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
    """Write a matplotlib figure, or an RGB image (H, W, 3) a probe rendered itself, to ``path``
    and as the TensorBoard image ``tag``; a figure is closed."""
    import numpy as np
    from PIL import Image

    if isinstance(fig, np.ndarray):
        rgb = fig
    else:
        import matplotlib.pyplot as plt

        # drawn once for both (savefig and add_figure would each render it: most of the
        # end-of-run probe time of a small model)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        plt.close(fig)
    buf = io.BytesIO()
    # zlib's fastest level: a third cheaper than the default 6 on these mostly white figures,
    # for files about 10% larger (a member's figure is drawn and saved at the end of every run)
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    path.write_bytes(buf.getvalue())
    tb.png(tag, buf.getvalue(), *rgb.shape[:2], step)
    return path


class Probes:
    """The probes of one run (``seed`` an int, data without a member dimension) or of the M
    members of a population (``seed`` one per member, ``x_train`` (M, n, ...), ``y_train``
    (M, n)): each member has its own probe batch and generator, those its lone run would have."""

    def __init__(self, cfg, x_train: torch.Tensor, y_train: torch.Tensor, seed: Union[int, Sequence[int]],
                 eval_batch_size: int):
        self.every = int(cfg.every)
        self.probes: List[Probe] = [PROBES[name](cfg[name]) for name in active(cfg)]
        self.batched = not isinstance(seed, int)
        seeds = list(seed) if self.batched else [seed]
        if self.batched:
            picks = [probe_batch(x_train[m], y_train[m], s, int(cfg.batch_size)) for m, s in enumerate(seeds)]
            self.x, self.y = torch.stack([x for x, _ in picks]), torch.stack([y for _, y in picks])
        else:
            self.x, self.y = probe_batch(x_train, y_train, seed, int(cfg.batch_size))
        self.x_train, self.y_train, self.eval_batch_size = x_train, y_train, eval_batch_size
        self.generators = [torch.Generator().manual_seed(s + DRAW_STREAM) for s in seeds]

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` is a periodic probe epoch (the end of the run is probed anyway)."""
        return self.every > 0 and epoch % self.every == 0

    def measure(self, model: nn.Module) -> Dict[str, float]:
        """A lone model's values (in eval mode)."""
        was_training = model.training
        model.eval()
        try:
            inputs = ProbeInputs(model, [p for p in model.parameters() if p.requires_grad], self.x, self.y,
                                 self.x_train, self.y_train, self.eval_batch_size)
            return self.measure_members(inputs)[0]
        finally:
            model.train(was_training)

    def measure_members(self, inputs: ProbeInputs) -> List[Dict[str, float]]:
        """Every member's values, each probe measuring all members at once."""
        out: List[Dict[str, float]] = [{} for _ in range(inputs.members)]
        for p in self.probes:
            for row, values in zip(out, p.measure(inputs, self.generators)):
                row.update(values)
        return out

    def member(self, k: int) -> "Probes":
        """Member k's probes as its lone run has them: its probe batch, training set and
        generator (shared: what the lone view draws, the member has drawn), probes of their own
        (whose figures show this member's measurement)."""
        lone = object.__new__(Probes)
        lone.every, lone.batched, lone.eval_batch_size = self.every, False, self.eval_batch_size
        lone.probes = [type(p)(p.cfg) for p in self.probes]
        lone.x, lone.y, lone.x_train, lone.y_train = self.x[k], self.y[k], self.x_train[k], self.y_train[k]
        lone.generators = [self.generators[k]]
        return lone

    def keep(self, idx: Sequence[int]) -> None:
        """Only the members ``idx`` go on (the others finished or diverged)."""
        sel = torch.tensor(list(idx), dtype=torch.long, device=self.x.device)
        self.x, self.y = self.x.index_select(0, sel), self.y.index_select(0, sel)
        self.x_train, self.y_train = self.x_train.index_select(0, sel), self.y_train.index_select(0, sel)
        self.generators = [self.generators[i] for i in idx]

    def save_figures(self, out_dir: Path, tb, epoch: int, member: int = 0) -> List[Path]:
        """Each probe's figures of a member's last measurement: ``<name>.png`` and the TensorBoard
        image ``probe/<name>``."""
        paths = []
        for p in self.probes:
            for name, fig in p.figures(epoch, member).items():
                paths.append(save_figure(fig, Path(out_dir) / f"{name}.png", tb, f"probe/{name}", epoch))
        return paths

    def state_dict(self, member: int = 0) -> Dict[str, Any]:
        return {"generator": self.generators[member].get_state()}

    def load_state_dict(self, state: Dict[str, Any], member: int = 0) -> None:
        self.generators[member].set_state(state["generator"])


def build_probes(cfg, x_train: torch.Tensor, y_train: torch.Tensor, seed: Union[int, Sequence[int]],
                 eval_batch_size: int) -> Optional[Probes]:
    """None when no probe is on (``probe=[]``, the default)."""
    return Probes(cfg, x_train, y_train, seed, eval_batch_size) if active(cfg) else None


def tags(values: Dict[str, float]) -> Dict[str, float]:
    """TensorBoard tags of measured values: ``probe/<key>``."""
    return {f"probe/{k}": v for k, v in values.items()}


def record(history: List[Dict[str, float]], epoch: int, values: Dict[str, float],
           logs: Dict[str, float]) -> None:
    """A measurement at ``epoch``: a row of the run's ``probe_history`` and its TensorBoard
    scalars (added to the epoch's ``logs``)."""
    history.append({"epoch": epoch, **values})
    logs.update(tags(values))


def checkpoint_fields(state: Optional[Dict[str, Any]], history: List[Dict[str, float]]) -> Dict[str, Any]:
    """What ``checkpoint.pt`` holds of the probes (lone runs and population members alike):
    the measurements so far and the generator ``state`` (None without probes)."""
    return {"probe_history": list(history), "probes": state}  # a copy: the run's list grows on


def metrics_fields(on: bool, final: Dict[str, float], history: List[Dict[str, float]]) -> Dict[str, Any]:
    """What ``metrics.json`` holds of the probes: the final weights' values (empty if the run did
    not complete) and every measurement; nothing when no probe is on."""
    return {"probes": final, "probe_history": history} if on else {}
