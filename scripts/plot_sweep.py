#!/usr/bin/env python
"""Rebuild results.csv, curve.csv, the plot and the sweep-level TensorBoard run of any sweep folder.

    python scripts/plot_sweep.py outputs/multirun/2025-01-01_12-00-00 --x model.width
    python scripts/plot_sweep.py outputs/runs/<double_descent run> --x epoch --name epochs
    python scripts/plot_sweep.py outputs/multirun/<optimizer × width> --x optimizer --hue model.width

Works on an in-process sweep (task=sweep, +experiment=double_descent...) and on a Hydra
multirun (-m, any launcher) whose job folders hold metrics.json and .hydra/overrides.yaml, and
on the <hydra.sweep.dir>/points folder of a sharded sweep (sweep.shards). The run folders are
read by regexp.results, as regexp.results.load(sweep_dir) shows them in a notebook.
An x whose values are not numbers (optimizer, regularizer lists, booleans) gets one tick per
value and a point with a ±std bar over seeds; --hue picks the one key that splits the curve.
Failed or unfinished jobs get a row with their status and are left out of the plot. Without
--name/--title/--invert-x, the settings come from the sweep's own extra.plot when it has one.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from regexp.analysis.collect import collect_runs  # noqa: E402
from regexp.analysis.report import format_curve, plot_settings, report  # noqa: E402
from regexp.errors import ConfigError  # noqa: E402
from regexp.experiments._emc import FOLDER, read_table  # noqa: E402


def saved_settings(sweep_dir: Path):
    """The sweep's own extra.plot (an in-process sweep keeps its config in .hydra/config.yaml; the
    points/ folder of a sharded sweep (sweep.shards) has the multirun's multirun.yaml above it)."""
    config = sweep_dir / ".hydra" / "config.yaml"
    if not config.exists() and sweep_dir.name == "points":
        config = sweep_dir.parent / "multirun.yaml"
    extra = OmegaConf.load(config).get("extra") if config.exists() else None
    return plot_settings(extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--x", required=True, help="the swept key on the x axis (e.g. model.width), or epoch")
    ap.add_argument("--name", help="the plot is <name>.png (default: the sweep's extra.plot.name or 'sweep')")
    ap.add_argument("--title")
    ap.add_argument("--x-label")
    ap.add_argument("--invert-x", action="store_true", help="plot 1/x (e.g. 1/λ for weight decay)")
    ap.add_argument("--hue", help="the swept key that splits the curve into series (default: every other "
                                  "swept key; with --hue, the others are averaged with the seeds)")
    args = ap.parse_args(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise ConfigError(f"sweep dir {str(args.sweep_dir)!r} is not a folder")
        settings = saved_settings(args.sweep_dir)
        given = {"name": args.name, "title": args.title, "x_label": args.x_label,
                 "invert_x": True if args.invert_x else None, "hue": args.hue}
        settings = replace(settings, **{k: v for k, v in given.items() if v is not None})
        if "/" in settings.name or not settings.name:
            raise ConfigError(f"--name={settings.name!r} is invalid: expected a file name without '/'")
        emc_dir = (args.sweep_dir / FOLDER).resolve()  # extra.emc's runs at smaller sizes: not points
        runs = [r for r in collect_runs(args.sweep_dir) if emc_dir not in Path(r.dir).resolve().parents]
        curve = report(args.sweep_dir, runs, args.x, settings, emc=read_table(args.sweep_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_curve(curve, invert_x=settings.invert_x))
    statuses = [r.status for r in runs]
    bad = len(statuses) - statuses.count("completed")
    print(f"{len(runs)} runs ({bad} not completed, left out of the plot)")
    print(args.sweep_dir / f"{settings.name}.png")
    print(args.sweep_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
