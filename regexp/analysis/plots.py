"""Draw a sweep's curve: error (and loss) against the swept value, mean line and band over seeds.

Uses matplotlib's object API (``Figure`` + Agg canvas), not pyplot, so a sweep inside a
long-lived process or a launcher never touches a global figure manager or a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from regexp.analysis.curves import Curve

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


def plot_curve(curve: Curve, path: Path, title: str = "", x_label: Optional[str] = None,
               invert_x: bool = False) -> Figure:
    """Write ``path`` (PNG) and return the figure (for TensorBoard)."""
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    label = x_label or (f"1 / {curve.x_key}" if invert_x else curve.x_key)
    for ax, kind in zip(fig.subplots(1, 2), ("error", "loss")):
        if _panel(ax, curve, kind, invert_x):
            ax.set_xscale("log")
            _plain_ticks(ax, curve, invert_x)
        if kind == "loss":
            ax.set_yscale("log")  # interpolating models' test loss runs off any linear scale
            ax.yaxis.set_major_formatter(PLAIN)
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel(f"{kind} (mean ± std over seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"{curve.x_key} sweep")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig
