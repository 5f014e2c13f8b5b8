"""The sweep-level TensorBoard run: the curve itself as scalars whose step is the swept value.

TensorBoard's x axis is an integer step, so the step is the swept value when every value is a
whole number (widths, sample counts, epochs) and its index otherwise (weight decay λ); the
``sweep/x`` scalar holds the value itself. A categorical x (optimizer names) is logged at its
category's index, and the ``sweep/x_axis`` text names the category of each step. The event file
sits in the sweep folder, next to the point folders, with the suffix ``.sweep`` so that rewriting
it (a re-run, or ``scripts/plot_sweep.py``) replaces only this file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from regexp.analysis.curves import METRICS, PROBE_METRICS, Curve, category_label

SUFFIX = ".sweep"


def curve_steps(curve: Curve) -> Dict[float, int]:
    xs = sorted({p.x for s in curve.series for p in s.points})
    if curve.categories is not None:  # x is already the category's index
        return {x: int(x) for x in xs}
    if all(x == int(x) and x >= 0 for x in xs):
        return {x: int(x) for x in xs}
    return {x: i for i, x in enumerate(xs)}


def tag(metric: str, series: str) -> str:
    return f"sweep/{metric}" + (f"/{series}" if series else "")


def log_curve(sweep_dir: Path, curve: Curve, fig=None) -> Optional[Path]:
    """Rewrite the sweep-level event file; return its path."""
    from torch.utils.tensorboard import SummaryWriter

    for old in Path(sweep_dir).glob(f"events.out.tfevents.*{SUFFIX}"):
        old.unlink()
    steps = curve_steps(curve)
    w = SummaryWriter(str(sweep_dir), filename_suffix=SUFFIX)
    for s in curve.series:
        for p in s.points:
            step = steps[p.x]
            w.add_scalar(tag("x", s.name), p.x, step)
            if p.params is not None:
                w.add_scalar(tag("params", s.name), p.params, step)
            if p.emc is not None:
                w.add_scalar(tag("emc", s.name), p.emc, step)
            for m in METRICS + PROBE_METRICS:
                if m in p.mean:
                    w.add_scalar(tag(m, s.name), p.mean[m], step)
                    w.add_scalar(tag(f"{m}_std", s.name), p.std[m], step)
    integral = all(k == v for k, v in steps.items())
    if curve.categories is not None:
        w.add_text("sweep/x_axis", f"step = index of {curve.x_key} in "
                   + ", ".join(f"{i}: {category_label(c)}" for i, c in enumerate(curve.categories)))
    else:
        w.add_text("sweep/x_axis", f"step = {curve.x_key}" if integral else
                   f"step = index of {curve.x_key} in " + ", ".join(f"{x:g}" for x in steps))
    if fig is not None:
        w.add_figure("sweep/plot", fig, 0, close=False)
    w.close()
    files = sorted(Path(sweep_dir).glob(f"events.out.tfevents.*{SUFFIX}"))
    return files[-1] if files else None
