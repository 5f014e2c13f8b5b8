"""Categorical x axes and --hue: plot_sweep.py and report() on fake sweep folders and a real multirun.

The fake sweeps are Hydra multirun folders (``<sweep>/<job>/metrics.json`` with the job's
``overrides``, as the trainer writes them) whose accuracies are chosen, so every mean and std in
curve.csv can be checked against numbers computed here.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from regexp.analysis.collect import Run, collect_runs
from regexp.analysis.curves import Curve, CurvePoint, Series, aggregate
from regexp.analysis.plots import plot_curve
from regexp.analysis.report import plot_settings, report
from regexp.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SEEDS = (0, 1, 2)


def plot_sweep(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts/plot_sweep.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def error_of(point: Dict[str, Any]) -> float:
    """A test error that differs with every key and seed, so pooling the wrong runs shows."""
    opt = {"sgd": 0.30, "adam": 0.20, "rmsprop": 0.25}[point["optimizer"]]
    return opt + point.get("model.width", 0) / 1000 + point.get("data.label_noise", 0) / 10 + point["seed"] / 100


def fake_sweep(root: Path, points: List[Dict[str, Any]], hydra_dir: bool = False) -> Path:
    """A multirun folder: one job per point, its metrics.json as the trainer writes it."""
    for i, point in enumerate(points):
        job = root / str(i)
        job.mkdir(parents=True)
        overrides = [f"{k}={v}" for k, v in point.items()]
        err = error_of(point)
        metrics = {"status": "completed", "epochs": 1, "params": 1234, "overrides": overrides,
                   "final": {"train_acc": 1.0 - err / 2, "test_acc": 1.0 - err,
                             "train_loss": err, "test_loss": 2 * err}}
        if hydra_dir:  # the job's overrides as Hydra saves them, not only in metrics.json
            (job / ".hydra").mkdir()
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            metrics.pop("overrides")
        (job / "metrics.json").write_text(json.dumps(metrics))
    return root


def expected(points: List[Dict[str, Any]], **where: Any):
    errs = [error_of(p) for p in points if all(p[k] == v for k, v in where.items())]
    return statistics.mean(errs), statistics.stdev(errs), len(errs)


def grid(**axes) -> List[Dict[str, Any]]:
    points: List[Dict[str, Any]] = [{}]
    for k, values in axes.items():
        points = [{**p, k: v} for p in points for v in values]
    return points


# ---------------------------------------------------------------- plot_sweep.py --x <categorical>
def test_categorical_x_gives_one_curve_row_per_category_with_mean_and_std_over_seeds(tmp_path):
    points = grid(optimizer=OPTIMIZERS, seed=SEEDS)
    sweep = fake_sweep(tmp_path / "sweep", points, hydra_dir=True)
    failed = sweep / "crashed"  # a job that died: a results row, no effect on the curve
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optimizer=adam", "seed=3"]))

    q = plot_sweep(sweep, "--x", "optimizer", "--name", "opt")
    assert q.returncode == 0, q.stderr
    assert (sweep / "opt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = read_rows(sweep / "curve.csv")
    assert [c["optimizer"] for c in curve] == ["adam", "rmsprop", "sgd"]  # sorted: one stable order
    for c in curve:
        mean, std, n = expected(points, optimizer=c["optimizer"])
        assert int(c["seeds"]) == n == 3
        assert float(c["test_error_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(c["test_error_std"]) == pytest.approx(std, abs=1e-12)
        assert float(c["train_error_mean"]) == pytest.approx(mean / 2, abs=1e-12)
        assert c["threshold"] == ""  # no crossing between categories
    results = read_rows(sweep / "results.csv")
    assert len(results) == 10 and [r["status"] for r in results].count("failed") == 1


def test_list_and_boolean_x_are_categories(tmp_path):
    regs = (["weight_decay", "dropout"], ["dropout"], [])
    runs = [Run(tmp_path / str(i), {"regularizer": r, "seed": s},
                {"status": "completed", "final": {"test_acc": 0.5 + i / 10 + s / 100}}, None)
            for i, r in enumerate(regs) for s in (0, 1)]
    curve = report(tmp_path, runs, "regularizer", plot_settings({"plot": {"name": "regs"}}))
    assert curve.categories == [[], ["dropout"], ["weight_decay", "dropout"]]
    assert [round(p.mean["test_error"], 6) for p in curve.series[0].points] == [0.295, 0.395, 0.495]
    assert [c["regularizer"] for c in read_rows(tmp_path / "curve.csv")] == \
        ["[]", "['dropout']", "['weight_decay', 'dropout']"]  # as results.csv writes the value

    rows = [{"norm": b, "status": "completed", "test_error": e} for b, e in ((True, 0.1), (False, 0.3), (True, 0.2))]
    curve = aggregate(rows, "norm", [])
    assert curve.categories == [True, False]  # first-seen order when aggregate is called directly
    assert [(p.raw, p.n, p.mean["test_error"]) for p in curve.series[0].points] == \
        [(True, 2, pytest.approx(0.15)), (False, 1, 0.3)]


def test_plot_curve_puts_one_tick_per_category_and_the_means_on_them(tmp_path):
    rows = [{"regularizer": r, "seed": s, "status": "completed", "test_error": e + s / 10, "train_error": 0.0,
             "test_loss": 1.0, "train_loss": 0.5}
            for r, e in ((["weight_decay", "dropout"], 0.2), ("none", 0.4), (True, 0.3)) for s in (0, 1)]
    curve = aggregate(rows, "regularizer", [])
    fig = plot_curve(curve, tmp_path / "c.png")
    error_ax, loss_ax = fig.axes
    for ax in (error_ax, loss_ax):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["[weight_decay,dropout]", "none", "true"]
        assert ax.get_xscale() == "linear" and ax.get_xlim() == (-0.5, 2.5)
    # The test-error points: one per category, next to its tick, at the mean over seeds.
    (test_bars,) = [c for c in error_ax.containers if c.get_label() == "test error"]
    xs, ys = test_bars.lines[0].get_data()
    assert [round(x) for x in xs] == [0, 1, 2] and all(abs(x - round(x)) < 0.35 for x in xs)
    assert list(ys) == pytest.approx([0.25, 0.45, 0.35])


# ---------------------------------------------------------------- --hue
def test_hue_splits_a_categorical_curve_and_pools_the_other_keys(tmp_path):
    points = grid(optimizer=("sgd", "adam"), **{"model.width": (8, 16), "data.label_noise": (0.0, 0.2)},
                  seed=(0, 1))
    sweep = fake_sweep(tmp_path / "sweep", points)
    q = plot_sweep(sweep, "--x", "optimizer", "--hue", "model.width")
    assert q.returncode == 0, q.stderr
    curve = read_rows(sweep / "curve.csv")
    assert [(c["series"], c["optimizer"]) for c in curve] == [
        (f"model.width={w}", o) for w in (8, 16) for o in ("adam", "sgd")]
    for c in curve:
        w = int(c["series"].split("=")[1])
        mean, std, n = expected(points, optimizer=c["optimizer"], **{"model.width": w})
        assert int(c["seeds"]) == n == 4  # both label noises pooled with the two seeds
        assert float(c["test_error_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(c["test_error_std"]) == pytest.approx(std, abs=1e-12)
    # Without --hue every other swept key splits the curve, as before.
    assert plot_sweep(sweep, "--x", "optimizer").returncode == 0
    assert len({c["series"] for c in read_rows(sweep / "curve.csv")}) == 4


def test_hue_splits_a_numeric_curve_into_one_line_per_value(tmp_path):
    points = grid(optimizer=("sgd", "adam"), **{"model.width": (8, 16, 32)}, seed=(0, 1))
    sweep = fake_sweep(tmp_path / "sweep", points)
    runs = collect_runs(sweep)
    curve = report(sweep, runs, "model.width", plot_settings({"plot": {"hue": "optimizer"}}))
    assert [s.name for s in curve.series] == ["optimizer=adam", "optimizer=sgd"]
    for s in curve.series:
        opt = s.name.split("=")[1]
        assert [p.raw for p in s.points] == [8, 16, 32]
        assert [p.mean["test_error"] for p in s.points] == pytest.approx(
            [expected(points, optimizer=opt, **{"model.width": w})[0] for w in (8, 16, 32)], abs=1e-12)
    fig = plot_curve(curve, sweep / "again.png")
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == ["test error (optimizer=adam)", "train error (optimizer=adam)",
                      "test error (optimizer=sgd)", "train error (optimizer=sgd)"]


def test_bad_hue_and_bad_x_are_one_error_line_naming_the_valid_keys(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep", grid(optimizer=("sgd", "adam"), **{"model.width": (8, 16)}, seed=(0,)))
    for args, named in ((("--x", "optimizer", "--hue", "nosuch"), "hue='nosuch'"),
                        (("--x", "optimizer", "--hue", "optimizer"), "hue='optimizer'"),
                        (("--x", "nosuch"), "x='nosuch'")):
        q = plot_sweep(sweep, *args)
        assert q.returncode == 2, q.stderr
        lines = q.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], q.stderr
        assert "model.width" in lines[0]
        assert not (sweep / "curve.csv").exists()  # nothing half-written
    with pytest.raises(ConfigError, match="extra.plot.hue=3 is invalid"):
        plot_settings({"plot": {"hue": 3}})
    with pytest.raises(ConfigError, match="invert_x=true is invalid for x='optimizer'.*adam, sgd"):
        report(sweep, collect_runs(sweep), "optimizer", plot_settings({"plot": {"invert_x": True}}))


# ---------------------------------------------------------------- numeric x: unchanged
def test_numeric_x_keeps_the_line_plot_and_its_curve(tmp_path):
    runs = [Run(tmp_path / f"w={w},s={s}", {"model.width": w, "seed": s},
                {"status": "completed", "params": 100 * w, "final": {"test_acc": 1 - w / 100 - s / 10,
                                                                      "train_acc": 1.0}}, n_train=1600)
            for w in (32, 4, 16) for s in (0, 1)]
    curve = report(tmp_path, runs, "model.width", plot_settings({"plot": {"name": "w"}}))
    assert curve.categories is None
    rows = read_rows(tmp_path / "curve.csv")
    assert [(r["series"], r["model.width"], r["seeds"]) for r in rows] == [
        ("", "4", "2"), ("", "16", "2"), ("", "32", "2")]
    assert [float(r["test_error_mean"]) for r in rows] == pytest.approx([0.09, 0.21, 0.37])
    assert [float(r["test_error_std"]) for r in rows] == pytest.approx([0.1 / 2 ** 0.5] * 3)
    assert float(rows[0]["threshold"]) == pytest.approx(16.0)  # 100 w = 1600
    fig = plot_curve(curve, tmp_path / "w.png")
    assert fig.axes[0].get_xscale() == "log"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["4", "16", "32"]


# ---------------------------------------------------------------- TensorBoard
def test_tensorboard_logs_categories_at_their_index(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = grid(optimizer=OPTIMIZERS, seed=SEEDS)
    sweep = fake_sweep(tmp_path / "sweep", points)
    report(sweep, collect_runs(sweep), "optimizer", plot_settings({}))
    (events,) = sweep.glob("events.out.tfevents.*.sweep")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("sweep/test_error")}
    assert logged == {i: pytest.approx(expected(points, optimizer=o)[0], abs=1e-6)
                      for i, o in enumerate(("adam", "rmsprop", "sgd"))}
    (text,) = acc.Tensors("sweep/x_axis/text_summary")
    assert text.tensor_proto.string_val[0].decode() == "step = index of optimizer in 0: adam, 1: rmsprop, 2: sgd"


# ---------------------------------------------------------------- a real multirun
def test_plot_sweep_on_a_real_optimizer_multirun(tmp_path, cli):
    sweep = tmp_path / "multi"
    cli(["-m", "optimizer=sgd,adam", "seed=0,1", "trainer.epochs=1", "data.n_train=200", "data.n_test=200",
         "trainer.threads=1", "logger.tensorboard=false", f"hydra.sweep.dir={sweep}"])
    q = plot_sweep(sweep, "--x", "optimizer")
    assert q.returncode == 0, q.stderr
    per_job = {}
    for m in (json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")):
        opt = next(o.split("=")[1] for o in m["overrides"] if o.startswith("optimizer="))
        per_job.setdefault(opt, []).append(1.0 - m["final"]["test_acc"])
    curve = read_rows(sweep / "curve.csv")
    assert [c["optimizer"] for c in curve] == ["adam", "sgd"]
    for c in curve:
        errs = per_job[c["optimizer"]]
        assert len(errs) == int(c["seeds"]) == 2
        assert float(c["test_error_mean"]) == pytest.approx(statistics.mean(errs), abs=1e-12)
        assert float(c["test_error_std"]) == pytest.approx(statistics.stdev(errs), abs=1e-12)
    assert (sweep / "sweep.png").stat().st_size > 10_000


def test_in_process_sweep_report_with_a_categorical_x_and_extra_plot_hue(tmp_path, cli):
    out = tmp_path / "sweep"
    cli(["task=sweep", "++sweep.params={model.activation:[tanh,relu],model.width:[4,8]}", "sweep.seeds=[0,1]",
         "trainer.epochs=1", "data.n_train=200", "data.n_test=200", "trainer.threads=1",
         "+extra.plot.hue=model.width", f"hydra.run.dir={out}"])
    curve = read_rows(out / "curve.csv")  # x = the first swept key, split by the hue only
    assert [(c["series"], c["model.activation"]) for c in curve] == [
        (f"model.width={w}", a) for w in (4, 8) for a in ("relu", "tanh")]
    for c in curve:
        w = c["series"].split("=")[1]
        errs = [1.0 - json.loads((out / f"model.activation={c['model.activation']},model.width={w},seed={s}"
                                  / "metrics.json").read_text())["final"]["test_acc"] for s in (0, 1)]
        assert int(c["seeds"]) == 2
        assert float(c["test_error_mean"]) == pytest.approx(statistics.mean(errs), abs=1e-12)
        assert float(c["test_error_std"]) == pytest.approx(statistics.stdev(errs), abs=1e-12)
    assert (out / "sweep.png").stat().st_size > 10_000


# ---------------------------------------------------------------- log-x tick labels
def _flat_curve(xs: List[float]) -> Curve:
    m = {"test_error": 0.5, "train_error": 0.1, "test_loss": 2.0, "train_loss": 0.5}
    return Curve("x", [Series("", [CurvePoint(x, x, 2, dict(m), {k: 0.01 for k in m}) for x in xs])])


def _labels(ax):
    """The x tick labels drawn inside the view (plot_curve has drawn the figure), with their boxes in
    pixels; no two of them overlap."""
    lo, hi = sorted(ax.get_xlim())
    labels = [(t.label1.get_text(), t.label1.get_window_extent()) for t in ax.xaxis.get_major_ticks()
              if lo <= t.get_loc() <= hi and t.label1.get_visible() and t.label1.get_text()]
    for i, (a, box_a) in enumerate(labels):
        for b, box_b in labels[i + 1:]:
            assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r} in {[t for t, _ in labels]}"
    return [t for t, _ in labels]


@pytest.mark.parametrize("xs", [
    [100 * 1.05 ** i for i in range(60)],  # 60 points in under two decades
    [1.5 ** i for i in range(40)],  # 40 points over seven decades
])
def test_log_x_tick_labels_of_many_points_never_overlap(tmp_path, xs):
    fig = plot_curve(_flat_curve(xs), tmp_path / "c.png")
    ax = fig.axes[0]  # both panels share the x ticks' logic
    assert ax.get_xscale() == "log" and len(_labels(ax)) >= 3
    # Every swept value keeps a tick, labelled or not.
    ticks = list(ax.get_xticks()) + list(ax.get_xticks(minor=True))
    assert all(any(abs(t / x - 1) < 1e-9 for t in ticks) for x in xs)


def test_log_x_labels_are_the_swept_values_or_powers_of_ten(tmp_path):
    # Under two decades: the swept values that fit (1750 and 2250 crowd 2000 out of its room).
    fig = plot_curve(_flat_curve([500, 1000, 1500, 1750, 2000, 2250, 2500, 3000, 4000]), tmp_path / "n.png")
    labels = _labels(fig.axes[0])
    assert {"500", "1000", "4000"} <= set(labels) and "1750" not in labels
    assert set(labels) <= {"500", "1000", "1500", "1750", "2000", "2250", "2500", "3000", "4000"}
    # 1/λ from 10 to 10⁵: the powers of ten, written out, not 3.33e+04.
    fig = plot_curve(_flat_curve([10.0 ** -k for k in range(1, 6)] + [3 * 10.0 ** -k for k in range(2, 6)]),
                     tmp_path / "l.png", invert_x=True)
    assert _labels(fig.axes[0]) == ["10", "100", "1000", "10000", "100000"]
