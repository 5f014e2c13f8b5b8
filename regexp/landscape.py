"""Loss landscapes of a finished run: ``python -m regexp.landscape RUN_DIR [--other RUN_DIR2]``.

Drawn on the run's final weights θ, in eval mode (dropout off, batch norm on its running
statistics), with the data term alone (mean cross-entropy, as the probes measure it), on a fixed
batch of training examples (the probes' draw from the run's seed) and, with ``--test``, on the
whole test split:

- ``line``: θ(α) = (1 − α) θ_init + α θ_final, α ∈ [−0.25, 1.25], the linear path from the
  initial weights to the final ones (Goodfellow, Vinyals & Saxe 2015: for many networks the loss
  falls monotonically along it, no barrier between the start and the solution). θ_init is the
  run's ``init_model.pt``; a folder written before the trainer saved it gets the initial weights
  rebuilt from the config and seed through the trainer's own construction code.
- ``between`` (with ``--other``): the same line from this run's final weights to another run's
  (e.g. small- against large-batch, Keskar et al. 2017); the same architecture is required.
- ``slice_1d`` / ``slice_2d``: θ + α d₁ and θ + α d₁ + β d₂ along filter-normalised random
  directions (Li et al. 2018, "Visualizing the loss landscape of neural nets", §4): each filter of
  a Gaussian direction (an output row of a Linear layer, an output channel of a convolution: the
  slices along the first dimension of every weight of two or more dimensions) is rescaled to the
  norm of the same filter of θ, so the plot's scale follows the weights' scale, which a ReLU
  network can change without changing its function. Biases and the parameters of norm layers
  (every one-dimensional tensor) get 0 in the direction, as Li et al. do by default (their
  ``ignore_biases`` / ``ignore_bn``), and buffers stay at θ's values.

Everything goes into ``RUN_DIR/landscape/`` (``line.csv``, ``between.csv``, ``slice_1d.csv``,
``slice_2d.csv``, a PNG of each, ``summary.json`` and TensorBoard images ``landscape/<name>`` in
that folder's events); nothing else in the run folder is touched. A command rather than a
``task=``: it reads a finished run folder instead of composing a config to train.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from regexp.errors import ConfigError
from regexp.train.io import load_tensors, read_json

OUT = "landscape"
LINE = (-0.25, 1.25)
# Offset of the directions' generator from the run's seed (apart from the probes' streams).
DIRECTION_STREAM = 3_000_017
FINISHED = "a finished run folder holds metrics.json and model.pt"

State = Dict[str, torch.Tensor]


# ---- the run folder

def load_run(run_dir: Path) -> Tuple[dict, State]:
    """The resolved config of a completed run and its final weights (``model.pt``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such folder ({FINISHED})")
    for name in ("metrics.json", "model.pt"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: no {name} ({FINISHED})")
    metrics = read_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict) or "config" not in metrics:
        raise ConfigError(f"{run_dir / 'metrics.json'}: no config in it ({FINISHED}, written by regexp.run)")
    if metrics.get("status") != "completed":
        raise ConfigError(f"{run_dir}: the run is {metrics.get('status')!r}, not completed; only a completed "
                          "run's model.pt holds its final weights")
    return metrics["config"], read_state(run_dir / "model.pt")


def read_state(path: Path) -> State:
    state = load_tensors(path, "model file", "point regexp.landscape at a run folder regexp wrote")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a model file (expected a state dict of tensors, as a run's model.pt)")
    return state


def build(config: dict, run_dir: Path, device: torch.device):
    """The run's data and its model with the initial weights, built as the trainer builds them."""
    from omegaconf import OmegaConf

    from regexp.data import load_data
    from regexp.train.trainer import build_initial_model

    cfg = OmegaConf.create(config)
    data = load_data(cfg.data, cfg.seed)
    # out_dir None: a regularizer that writes files of its own must not write into the run folder
    model, _, regs = build_initial_model(cfg, data, device, None)
    for r in regs:
        r.attach(model)
    return cfg, data, model.eval()


def same_architecture(a: State, b: State, run_a: Path, run_b: Path) -> None:
    keys_a, keys_b = list(a), list(b)
    if keys_a != keys_b:
        only = sorted(set(keys_a) ^ set(keys_b))
        what = f"tensor {only[0]} is in one model only" if only else "their tensors are in another order"
        raise ConfigError(f"--other {run_b}: another architecture than {run_a} ({what}); the line between "
                          "two runs needs the same model")
    for k in keys_a:
        if a[k].shape != b[k].shape:
            raise ConfigError(f"--other {run_b}: another architecture than {run_a} ({k} is "
                              f"{tuple(b[k].shape)}, not {tuple(a[k].shape)}); the line between two runs "
                              "needs the same model")


# ---- directions and points

def filter_normalized_direction(model: nn.Module, theta: State, generator: torch.Generator) -> State:
    """A Gaussian direction with each filter rescaled to the norm of θ's filter (Li et al. 2018):
    d_i ← d_i ‖θ_i‖ / ‖d_i‖ for every slice i along the first dimension of a weight of two or
    more dimensions; 0 for biases and norm-layer parameters (one dimension) and for buffers."""
    params = {name for name, _ in model.named_parameters()}
    out: State = {}
    for k, t in theta.items():
        if k not in params or not t.is_floating_point() or t.dim() <= 1:
            out[k] = torch.zeros_like(t)
            continue
        d = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        th = t.detach().cpu().double()
        norms = lambda v: v.reshape(len(v), -1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))  # noqa: E731
        # the 1e-10 keeps a filter that θ has at exactly 0 at 0 in the direction too
        out[k] = (d * norms(th) / (norms(d) + 1e-10)).to(t.dtype).to(t.device)
    return out


def combine(base: State, terms: Sequence[Tuple[float, State]]) -> State:
    """base + Σ c·v over the floating tensors; integer buffers (batch counts) stay base's."""
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            v = v.clone()
            for c, d in terms:
                v.add_(d[k], alpha=c)
        out[k] = v
    return out


class Evaluator:
    """Loss and accuracy of the model at given weights, on the fixed train batch and optionally
    on the test split. The weights are loaded into the one model (no copy per point): on a small
    model a point costs a forward pass over the batch."""

    def __init__(self, model: nn.Module, splits: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                 eval_batch: int):
        self.model, self.splits, self.eval_batch = model, splits, eval_batch

    @torch.no_grad()
    def __call__(self, state: State) -> Dict[str, float]:
        from regexp.train.trainer import evaluate

        self.model.load_state_dict(state)
        row = {}
        for name, (x, y) in self.splits.items():
            loss, acc = evaluate(self.model, x, y, self.eval_batch)
            row[f"{name}_loss"], row[f"{name}_acc"] = loss.item(), acc.item()
        return row


def along_line(ev: Evaluator, a: State, b: State, alphas: np.ndarray) -> List[Dict[str, float]]:
    """Rows of θ(α) = (1 − α) a + α b."""
    diff = combine(b, [(-1.0, a)])
    return [{"alpha": float(t), **ev(combine(a, [(float(t), diff)]))} for t in alphas]


def slice_1d(ev: Evaluator, theta: State, d: State, alphas: np.ndarray) -> List[Dict[str, float]]:
    return [{"alpha": float(t), **ev(combine(theta, [(float(t), d)]))} for t in alphas]


def slice_2d(ev: Evaluator, theta: State, d1: State, d2: State, alphas: np.ndarray,
             betas: np.ndarray) -> List[Dict[str, float]]:
    return [{"alpha": float(a), "beta": float(b), **ev(combine(theta, [(float(a), d1), (float(b), d2)]))}
            for a in alphas for b in betas]


# ---- outputs

def write_csv(path: Path, rows: List[Dict[str, float]]) -> None:
    from regexp.train.io import atomic_write

    def write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def _line_figure(rows, title: str, marks: Dict[float, str], xlabel: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["alpha"] for r in rows]
    for split, color in (("train", "C0"), ("test", "C1")):
        if f"{split}_loss" in rows[0]:
            ax.plot(x, [r[f"{split}_loss"] for r in rows], color=color, label=f"{split} loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    for split, color in (("train", "C0"), ("test", "C1")):
        if f"{split}_acc" in rows[0]:
            ax2.plot(x, [r[f"{split}_acc"] for r in rows], color=color, ls=":", label=f"{split} accuracy")
    ax2.set_ylabel("accuracy (dotted)")
    for at, label in marks.items():
        ax.axvline(at, color="grey", lw=0.8, ls="--")
        ax.annotate(label, (at, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    ax.legend(loc="upper center", fontsize=8)
    ax.set_title(title, fontsize=9, pad=14)
    fig.tight_layout()
    return fig


def _contour_figure(rows, alphas: np.ndarray, betas: np.ndarray, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.array([r["train_loss"] for r in rows]).reshape(len(alphas), len(betas))
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    finite = z[np.isfinite(z)]
    hi = np.quantile(finite, 0.9) if finite.size else 1.0
    levels = np.linspace(finite.min(), hi, 16) if finite.size and hi > finite.min() else 16
    cs = ax.contour(betas, alphas, z, levels=levels, cmap="viridis")
    ax.clabel(cs, fontsize=6, fmt="%.2f")
    i, j = np.unravel_index(np.nanargmin(z), z.shape)
    ax.plot(0, 0, "k+", ms=10, label="θ (final weights)")
    ax.plot(betas[j], alphas[i], "r*", ms=12, label=f"minimum {z[i, j]:.3f}")
    ax.set_xlabel("β (direction 2)")
    ax.set_ylabel("α (direction 1)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def monotone_drop(rows: List[Dict[str, float]]) -> Tuple[bool, float]:
    """Whether the train loss never rises on α ∈ [0, 1], and its largest rise there (0 if none):
    the barrier along the line (Goodfellow, Vinyals & Saxe 2015)."""
    vals = [r["train_loss"] for r in rows if 0.0 <= r["alpha"] <= 1.0 + 1e-9]
    rise = max([b - a for a, b in zip(vals, vals[1:])] + [0.0])
    return rise <= 0.0, rise


# ---- the command

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m regexp.landscape", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished run folder (metrics.json, model.pt)")
    p.add_argument("--other", type=Path, help="a second finished run of the same model: the line between "
                   "the two final weights, on RUN_DIR's data")
    p.add_argument("--points", type=int, default=51, help="points along each line and the 1-D slice (51)")
    p.add_argument("--grid", type=int, default=25, help="points per axis of the 2-D slice (25)")
    p.add_argument("--range", type=float, nargs=2, default=(-1.0, 1.0), metavar=("A", "B"),
                   help="the slices' coefficient range (-1 1); the lines always span [-0.25, 1.25]")
    p.add_argument("--2d", dest="two_d", action="store_true", help="also the 2-D slice")
    p.add_argument("--batch", type=int, default=None,
                   help="training examples in the fixed batch (default: the run's probe.batch_size)")
    p.add_argument("--test", action="store_true", help="also the loss on the whole test split")
    p.add_argument("--seed", type=int, default=None, help="seed of the random directions (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    a = p.parse_args(argv)
    if a.points < 2:
        raise ConfigError(f"--points={a.points} is invalid: expected an integer >= 2")
    if a.grid < 2:
        raise ConfigError(f"--grid={a.grid} is invalid: expected an integer >= 2")
    lo, hi = a.range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"--range {lo:g} {hi:g} is invalid: expected two finite numbers A < B")
    if a.batch is not None and a.batch < 1:
        raise ConfigError(f"--batch={a.batch} is invalid: expected an integer >= 1")
    return a


def landscape(args: argparse.Namespace) -> Dict[str, object]:
    from regexp.probes.runner import probe_batch, save_figure
    from regexp.train.io import write_json
    from regexp.train.rundir import FolderBusy, RunLock
    from regexp.train.tblog import TBLogger
    from regexp.train.trainer import INIT_MODEL, resolve_device

    t0 = time.time()
    run_dir = Path(args.run_dir)
    config, final = load_run(run_dir)
    other = None
    if args.other is not None:
        _, other = load_run(args.other)
        same_architecture(final, other, run_dir, args.other)
    device = resolve_device(args.device)
    cfg, data, model = build(config, run_dir, device)
    if list(model.state_dict()) != list(final):
        raise ConfigError(f"{run_dir / 'model.pt'}: its tensors are not those of the model its config builds")
    init_path = run_dir / INIT_MODEL
    # cloned: the evaluator loads every point into this model's own tensors
    init = read_state(init_path) if init_path.is_file() else {k: v.clone() for k, v in model.state_dict().items()}
    init = {k: v.to(device) for k, v in init.items()}
    final = {k: v.to(device) for k, v in final.items()}

    x_train, y_train = (t.to(device) for t in data.split("train"))
    batch = args.batch if args.batch is not None else int(cfg.probe.batch_size)
    splits = {"train": probe_batch(x_train, y_train, int(cfg.seed), batch)}
    if args.test:
        splits["test"] = tuple(t.to(device) for t in data.split("test"))
    ev = Evaluator(model, splits, int(cfg.trainer.eval_batch_size))

    out = run_dir / OUT
    try:
        lock = RunLock(out).__enter__()
    except FolderBusy:
        raise ConfigError(f"{out} is in use by another regexp.landscape; wait for it to finish") from None
    try:
        for ev_file in out.glob("events.out.tfevents.*"):  # this folder's events are the landscape's own
            ev_file.unlink()
        tb = TBLogger(out)
        lo, hi = args.range
        alphas = with_points(np.linspace(*LINE, args.points), 0.0, 1.0)
        line = along_line(ev, init, final, alphas)
        write_csv(out / "line.csv", line)
        mono, rise = monotone_drop(line)
        src = "init_model.pt" if init_path.is_file() else "rebuilt from config and seed"
        save_figure(_line_figure(line, f"init → final ({src}); train batch of {len(splits['train'][1])}",
                                 {0.0: "init", 1.0: "final"}, "α: θ = (1−α) θ_init + α θ_final"),
                    out / "line.png", tb, f"{OUT}/line", 0)
        summary: Dict[str, object] = {
            "run_dir": str(run_dir), "init": src, "train_batch": len(splits["train"][1]),
            "line": {"init_loss": line[_index(alphas, 0.0)]["train_loss"],
                     "final_loss": line[_index(alphas, 1.0)]["train_loss"],
                     "monotone_on_0_1": mono, "largest_rise_on_0_1": rise}}
        if other is not None:
            between = along_line(ev, final, {k: v.to(device) for k, v in other.items()}, alphas)
            write_csv(out / "between.csv", between)
            save_figure(_line_figure(between, f"{run_dir.name} → {Path(args.other).name}",
                                     {0.0: "this run", 1.0: "other run"}, "α: θ = (1−α) θ_this + α θ_other"),
                        out / "between.png", tb, f"{OUT}/between", 0)
            losses = [r["train_loss"] for r in between if 0.0 <= r["alpha"] <= 1.0 + 1e-9]
            summary["between"] = {"other": str(args.other), "barrier": max(losses) - max(losses[0], losses[-1])}
        g = torch.Generator().manual_seed((args.seed if args.seed is not None else int(cfg.seed)) + DIRECTION_STREAM)
        d1 = filter_normalized_direction(model, final, g)
        coeffs = with_points(np.linspace(lo, hi, args.points), 0.0)
        s1 = slice_1d(ev, final, d1, coeffs)
        write_csv(out / "slice_1d.csv", s1)
        save_figure(_line_figure(s1, "θ + α d, d filter-normalised (Li et al. 2018)", {0.0: "θ"}, "α"),
                    out / "slice_1d.png", tb, f"{OUT}/slice_1d", 0)
        summary["slice_1d"] = {"min_loss": min(r["train_loss"] for r in s1)}
        if args.two_d:
            d2 = filter_normalized_direction(model, final, g)
            grid = with_points(np.linspace(lo, hi, args.grid), 0.0)
            s2 = slice_2d(ev, final, d1, d2, grid, grid)
            write_csv(out / "slice_2d.csv", s2)
            save_figure(_contour_figure(s2, grid, grid, "train loss, θ + α d₁ + β d₂ (filter-normalised)"),
                        out / "slice_2d.png", tb, f"{OUT}/slice_2d", 0)
            best = min(s2, key=lambda r: r["train_loss"])
            summary["slice_2d"] = {"grid": args.grid, "min_loss": best["train_loss"],
                                   "min_at": [best["alpha"], best["beta"]]}
        tb.close()
        summary["wall_s"] = round(time.time() - t0, 3)
        write_json(out / "summary.json", summary)
    finally:
        lock.__exit__(None, None, None)
    return summary


def with_points(values: np.ndarray, *points: float) -> np.ndarray:
    """``values`` with ``points`` that lie in their range added (θ itself, init and final are
    always evaluated exactly, not between two grid points)."""
    extra = [p for p in points if values[0] <= p <= values[-1]]
    return np.unique(np.concatenate([values, extra]).round(12))


def _index(values: np.ndarray, at: float) -> int:
    return int(np.argmin(np.abs(values - at)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from regexp.train.io import WriteFailed

    try:
        summary = landscape(parse_args(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
