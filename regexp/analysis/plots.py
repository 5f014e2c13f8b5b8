"""Draw a sweep's curve: error (and loss) against the swept value, mean line and band over seeds.

A categorical x (optimizer names, regularizer lists) has no order or distance between its
values, so it gets a point plot instead: one tick per category, the mean over seeds with a
±std error bar, the series (and train/test) side by side around each tick.

Uses matplotlib's object API (``Figure`` + Agg canvas), not pyplot, so a sweep inside a
long-lived process or a launcher never touches a global figure manager or a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from regexp.analysis.curves import Curve, category_label

COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
SPLIT_COLORS = {"test": "tab:red", "train": "tab:blue"}  # one series: the splits get the colours
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 40, not 4×10¹


def _panel(ax, curve: Curve, kind: str, invert_x: bool) -> bool:
    """Train (dashed) and test (solid) ``kind`` of every series; True when all x are positive (log-x)."""
    positive = True
    for i, s in enumerate(curve.series):
        for split, style in (("test", "-"), ("train", "--")):
            color = SPLIT_COLORS[split] if len(curve.series) == 1 else COLORS[i % len(COLORS)]
            metric = f"{split}_{kind}"
            pts = [p for p in s.points if metric in p.mean]
            if not pts:
                continue
            xs = [1.0 / p.x if invert_x and p.x else p.x for p in pts]
            order = sorted(range(len(xs)), key=xs.__getitem__)
            xs = [xs[j] for j in order]
            m = [pts[j].mean[metric] for j in order]
            sd = [pts[j].std[metric] for j in order]
            positive &= all(x > 0 for x in xs)
            label = f"{split} {kind}" + (f" ({s.name})" if s.name else "")
            ax.plot(xs, m, style, marker="o", ms=3, color=color, label=label)
            ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=color, alpha=0.15, linewidth=0)
        if s.threshold:
            t = 1.0 / s.threshold if invert_x else s.threshold
            ax.axvline(t, color="k" if len(curve.series) == 1 else COLORS[i % len(COLORS)], linestyle=":", linewidth=1.2,
                       label=f"params = n_train (x≈{t:.3g})" if i == 0 else None)
    return positive


def _plain_ticks(ax, curve: Curve, invert_x: bool) -> None:
    """Label a log axis with the swept values themselves when there are few of them."""
    xs = sorted({1.0 / p.x if invert_x and p.x else p.x for s in curve.series for p in s.points})
    if 0 < len(xs) <= 16:
        ax.set_xticks(xs)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(PLAIN)


def _points(ax, curve: Curve, kind: str) -> None:
    """Train (hollow square) and test (dot) ``kind`` of every series at each category, ±std bars."""
    slots = [(i, split) for i in range(len(curve.series)) for split in ("test", "train")]
    width = 0.7 / len(slots)  # the group of one category spans 0.7 of the gap between ticks
    for j, (i, split) in enumerate(slots):
        s = curve.series[i]
        color = SPLIT_COLORS[split] if len(curve.series) == 1 else COLORS[i % len(COLORS)]
        metric = f"{split}_{kind}"
        pts = [p for p in s.points if metric in p.mean]
        if not pts:
            continue
        offset = (j - (len(slots) - 1) / 2) * width
        ax.errorbar([p.x + offset for p in pts], [p.mean[metric] for p in pts],
                    yerr=[p.std[metric] for p in pts], fmt="o" if split == "test" else "s",
                    mfc=color if split == "test" else "none", color=color, ms=5, capsize=3,
                    label=f"{split} {kind}" + (f" ({s.name})" if s.name else ""))


def _category_ticks(ax, labels: List[str]) -> None:
    ax.set_xticks(range(len(labels)))
    long = sum(len(t) for t in labels) > 60  # slant the names rather than let them overlap
    ax.set_xticklabels(labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_xlim(-0.5, len(labels) - 0.5)


def plot_curve(curve: Curve, path: Path, title: str = "", x_label: Optional[str] = None,
               invert_x: bool = False) -> Figure:
    """Write ``path`` (PNG) and return the figure (for TensorBoard)."""
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    invert_x = invert_x and curve.categories is None  # categories have no 1/x
    label = x_label or (f"1 / {curve.x_key}" if invert_x else curve.x_key)
    for ax, kind in zip(fig.subplots(1, 2), ("error", "loss")):
        if curve.categories is not None:
            _points(ax, curve, kind)
            _category_ticks(ax, [category_label(c) for c in curve.categories])
        elif _panel(ax, curve, kind, invert_x):
            ax.set_xscale("log")
            _plain_ticks(ax, curve, invert_x)
        if kind == "loss":
            ax.set_yscale("log")  # interpolating models' test loss runs off any linear scale
            ax.yaxis.set_major_formatter(PLAIN)
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel(f"{kind} (mean ± std over seeds)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with no data (no losses logged) gets no legend
            ax.legend(fontsize=7)
    fig.suptitle(title or f"{curve.x_key} sweep")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig
