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
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from regexp.analysis.curves import PROBE_METRICS, Curve, category_label

COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
SPLIT_COLORS = {"test": "tab:red", "train": "tab:blue"}  # one series: the splits get the colours
PLAIN = FuncFormatter(lambda v, _: f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}")  # 40, not 4×10¹; 333, not 333.333
GAP_PX = 4  # least space between two x tick labels


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


def _log_ticks(ax, curve: Curve, invert_x: bool) -> None:
    """Label a log axis with round numbers: the swept values themselves when they span under two
    decades (widths 4…192, n_train 500…4000), else the powers of ten (1/λ from 10 to 10⁵, whose
    swept values 33.3, 333, ... would read badly). The other swept values get unlabelled ticks."""
    xs = sorted({1.0 / p.x if invert_x and p.x else p.x for s in curve.series for p in s.points})
    ax.xaxis.set_major_formatter(PLAIN)
    ax.xaxis.set_minor_formatter(NullFormatter())
    if not xs or xs[-1] / xs[0] >= 100:
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=8))
        if xs:
            ax.set_xticks(xs, minor=True)
        return
    ax.set_xticks(xs)


def _thin_labels(ax) -> None:
    """Drop the x tick labels that would overlap their left neighbour (keeping the tick, unlabelled):
    points dense near a threshold (n_train 1750, 2000, 2250) would otherwise print over each other.
    The labels are measured, not drawn: centred on their tick, as wide as the renderer sets them."""
    locs = list(ax.xaxis.get_majorticklocs())
    if not locs:
        return
    renderer = ax.figure.canvas.get_renderer()
    prop = ax.xaxis.get_major_ticks()[0].label1.get_fontproperties()
    formatter = ax.xaxis.get_major_formatter()
    formatter.set_locs(locs)
    xlim = ax.get_xlim()
    lo, hi = sorted(xlim)
    kept, dropped, right = [], [], -float("inf")
    for x in sorted(locs):
        text = formatter(x)
        if not lo <= x <= hi or not text:
            continue
        half = renderer.get_text_width_height_descent(text, prop, ismath=False)[0] / 2
        centre = ax.transData.transform((x, 0))[0]
        if centre - half < right + GAP_PX:
            dropped.append(x)
        else:
            kept.append(x)
            right = centre + half
    if dropped:
        minor = [x for x in ax.get_xticks(minor=True) if lo <= x <= hi]
        ax.set_xticks(kept)
        ax.set_xticks(sorted(set(minor) | set(dropped)), minor=True)
        ax.set_xlim(xlim)  # set_xticks widens the view to take in every tick it is given


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


def _curvature(ax, curve: Curve, invert_x: bool) -> bool:
    """Top Hessian eigenvalue (solid) and trace (dashed) of the final weights, per series; True
    when all x are positive (log-x)."""
    positive = True
    for i, s in enumerate(curve.series):
        for metric, style, name in ((PROBE_METRICS[0], "-", "top eigenvalue λ₁"), (PROBE_METRICS[1], "--", "trace")):
            pts = sorted((p for p in s.points if metric in p.mean),
                         key=lambda p: 1.0 / p.x if invert_x and p.x else p.x)
            if not pts:
                continue
            xs = [1.0 / p.x if invert_x and p.x else p.x for p in pts]
            positive &= all(x > 0 for x in xs)
            ax.errorbar(xs, [p.mean[metric] for p in pts], yerr=[p.std[metric] for p in pts], fmt=style,
                        marker="o", ms=3, capsize=2, color=COLORS[i % len(COLORS)],
                        label=name + (f" ({s.name})" if s.name else ""))
    return positive


def has_curvature(curve: Curve) -> bool:
    return any(m in p.mean for s in curve.series for p in s.points for m in PROBE_METRICS)


def plot_curve(curve: Curve, path: Path, title: str = "", x_label: Optional[str] = None,
               invert_x: bool = False) -> Figure:
    """Write ``path`` (PNG) and return the figure (for TensorBoard). Runs with ``probe=[hessian]``
    get a third panel: the curvature of their final weights."""
    kinds = ("error", "loss") + (("curvature",) if has_curvature(curve) else ())
    fig = Figure(figsize=(5.5 * len(kinds), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    invert_x = invert_x and curve.categories is None  # categories have no 1/x
    label = x_label or (f"1 / {curve.x_key}" if invert_x else curve.x_key)
    log_x = []
    for ax, kind in zip(fig.subplots(1, len(kinds)), kinds):
        if kind == "curvature":
            if _curvature(ax, curve, invert_x) and curve.categories is None:
                ax.set_xscale("log")
                _log_ticks(ax, curve, invert_x)
                log_x.append(ax)
            if curve.categories is not None:
                _category_ticks(ax, [category_label(c) for c in curve.categories])
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("Hessian of the training loss (mean ± std over seeds)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            continue
        if curve.categories is not None:
            _points(ax, curve, kind)
            _category_ticks(ax, [category_label(c) for c in curve.categories])
        elif _panel(ax, curve, kind, invert_x):
            ax.set_xscale("log")
            _log_ticks(ax, curve, invert_x)
            log_x.append(ax)
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
    for ax in log_x:  # after the layout: the labels' widths in pixels are final
        _thin_labels(ax)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


def plot_axes(curve: Curve, path: Path, title: str = "", x_label: Optional[str] = None) -> Figure:
    """Train and test error against three x axes side by side: the swept key, the parameter count
    and the effective model complexity (``extra.emc``; Nakkiran et al. 2019 find the test-error
    peak where EMC ≈ n_train, drawn dotted). A model whose EMC the measured sizes do not bracket
    (EMC ≥ the largest) sits at that bound, hollow."""
    fig = Figure(figsize=(15, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (attr, name) in zip(axes, (("x", x_label or curve.x_key), ("params", "parameters"),
                                       ("emc", "effective model complexity (train error ≤ ε)"))):
        for i, s in enumerate(curve.series):
            pts = sorted((p for p in s.points if getattr(p, attr) is not None), key=lambda p: getattr(p, attr))
            for split, style in (("test", "-"), ("train", "--")):
                metric = f"{split}_error"
                got = [p for p in pts if metric in p.mean]
                if not got:
                    continue
                color = SPLIT_COLORS[split] if len(curve.series) == 1 else COLORS[i % len(COLORS)]
                xs, ys = [getattr(p, attr) for p in got], [p.mean[metric] for p in got]
                ax.plot(xs, ys, style, color=color, label=f"{split} error" + (f" ({s.name})" if s.name else ""))
                for p, xv, yv in zip(got, xs, ys):
                    hollow = attr == "emc" and p.emc_censored
                    ax.plot([xv], [yv], "o", ms=4, color=color, mfc="none" if hollow else color)
            n_train = [p.n_train for p in pts if p.n_train is not None]
            if attr in ("params", "emc") and n_train:
                ax.axvline(n_train[0], color="k", linestyle=":", linewidth=1.2,
                           label=f"n_train = {n_train[0]:.0f}" if i == 0 else None)
        if all(getattr(p, attr) is None or getattr(p, attr) > 0 for s in curve.series for p in s.points):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(PLAIN)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(name + (" (hollow: EMC ≥ the largest size measured)" if attr == "emc" else ""), fontsize=8)
        ax.set_ylabel("error (mean over seeds)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title or f"{curve.x_key} sweep: three x axes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig
