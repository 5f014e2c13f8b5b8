"""Double-descent sweeps: the sweep task end to end, the multirun rebuild, and the curve mathematics.

The end-to-end tests run the real CLI on tiny sweeps (3 widths, a few epochs, the published
1000 test signals) and check every output against the runs' own metrics.json.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from regexp.analysis.collect import Run, parse_overrides, train_size
from regexp.analysis.curves import CurvePoint, aggregate, bump, threshold
from regexp.analysis.report import format_bump, plot_settings, report
from regexp.config import register_configs, validate
from regexp.errors import ConfigError
from regexp.sweep import grid, point_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = str(ROOT / "configs")
TINY = ["trainer.epochs=3", "trainer.eval_every=1", "data.n_test=500", "trainer.threads=1"]
EXPERIMENTS = ("double_descent", "double_descent_epochs", "double_descent_l2", "double_descent_samples",
               "double_descent_transformer", "double_descent_cnn", "double_descent_cnn_cifar10")


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regexp.run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def read_rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def scalars(event_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(event_dir.glob("events.out.tfevents.*.sweep"))
    assert len(files) == 1, files  # rewritten, never appended to
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def compose_experiment(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}", *overrides])


# ---------------------------------------------------------------- end to end through the CLI
def test_tiny_model_wise_sweep_through_the_cli(tmp_path):
    out = tmp_path / "dd"
    p = cli("+experiment=double_descent", "sweep.params={model.width:[4,16,64]}", "sweep.seeds=[0,1]",
            *TINY, f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == str(out)  # the last line names the sweep folder

    rows = read_rows(out / "results.csv")
    assert [(r["model.width"], r["seed"]) for r in rows] == [
        (w, s) for w in ("4", "16", "64") for s in ("0", "1")]  # exactly one row per point and seed
    for r in rows:
        m = json.loads((out / f"model.width={r['model.width']},seed={r['seed']}" / "metrics.json").read_text())
        assert r["status"] == m["status"] == "completed"
        assert int(r["params"]) == m["params"] == (lambda w: w * w + 52 * w + 10)(int(r["model.width"]))
        assert int(r["n_train"]) == 4000  # val_fraction 0: all published training signals
        for split in ("train", "test"):
            assert float(r[f"{split}_error"]) == 1.0 - m["final"][f"{split}_acc"]
            assert float(r[f"{split}_loss"]) == m["final"][f"{split}_loss"]
    assert is_png(out / "double_descent.png")

    # The sweep-level run: step = width, value = the mean over seeds of each run's final error.
    test_error = scalars(out, "sweep/test_error")
    assert sorted(test_error) == [4, 16, 64]
    for w in (4, 16, 64):
        per_seed = [float(r["test_error"]) for r in rows if r["model.width"] == str(w)]
        assert test_error[w] == pytest.approx(statistics.mean(per_seed), abs=1e-6)
        assert scalars(out, "sweep/test_error_std")[w] == pytest.approx(statistics.stdev(per_seed), abs=1e-6)
    assert scalars(out, "sweep/params") == {4: 234.0, 16: 1098.0, 64: 7434.0}

    # plot_sweep.py rebuilds the same rows from the folder alone.
    before = {(r["model.width"], r["seed"]): r for r in rows}
    q = subprocess.run([sys.executable, str(ROOT / "scripts/plot_sweep.py"), str(out), "--x", "model.width"],
                       capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    for r in read_rows(out / "results.csv"):
        b = before[(r["model.width"], r["seed"])]
        assert {k: r[k] for k in ("status", "params", "train_error", "test_error", "test_loss")} == \
               {k: b[k] for k in ("status", "params", "train_error", "test_error", "test_loss")}


def test_plot_sweep_on_a_multirun_with_a_failed_job(tmp_path):
    out = tmp_path / "multi"
    # width=0 fails validation: the job records status failed and the multirun goes on.
    p = cli("-m", "model.width=4,8,0", "seed=0", "data.val_fraction=0", "logger.histogram_every=0",
            *TINY, f"hydra.sweep.dir={out}")
    assert p.returncode == 1  # the sweep summary reports the failure
    jobs = {json.loads((d / "metrics.json").read_text())["overrides"][0]: d for d in out.iterdir() if d.is_dir()}
    assert set(jobs) == {"model.width=4", "model.width=8", "model.width=0"}
    # A job that died before writing metrics.json must count too: copy a job's .hydra, width 16.
    crashed = out / "crashed"
    (crashed / ".hydra").mkdir(parents=True)
    for name in ("overrides.yaml", "config.yaml"):
        text = (jobs["model.width=4"] / ".hydra" / name).read_text()
        (crashed / ".hydra" / name).write_text(text.replace("model.width=4", "model.width=16"))

    q = subprocess.run([sys.executable, str(ROOT / "scripts/plot_sweep.py"), str(out), "--x", "model.width",
                        "--name", "dd"], capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    assert q.stdout.strip().splitlines()[-1] == str(out)
    rows = {r["model.width"]: r for r in read_rows(out / "results.csv")}
    assert list(next(iter(rows.values())))[:3] == ["model.width", "seed", "status"]  # constant keys left out
    assert set(rows) == {"0", "4", "8", "16"}
    assert rows["0"]["status"] == "failed" and "model.width" in rows["0"]["error"]
    assert rows["16"]["status"] == "failed" and "metrics.json" in rows["16"]["error"]
    for w in ("4", "8"):
        m = json.loads((jobs[f"model.width={w}"] / "metrics.json").read_text())
        assert float(rows[w]["test_error"]) == 1.0 - m["final"]["test_acc"]
        assert int(rows[w]["n_train"]) == 4000
    curve = read_rows(out / "curve.csv")
    assert [c["model.width"] for c in curve] == ["4", "8"]  # failed jobs are left out of the plot
    assert sorted(scalars(out, "sweep/test_error")) == [4, 8]
    assert is_png(out / "dd.png")


def test_plot_sweep_names_a_bad_x_key(tmp_path):
    run = tmp_path / "model.width=4,seed=0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "overrides": ["model.width=4"]}))
    q = subprocess.run([sys.executable, str(ROOT / "scripts/plot_sweep.py"), str(tmp_path), "--x", "model.depth"],
                       capture_output=True, text=True, timeout=120)
    assert q.returncode == 2
    assert "x='model.depth'" in q.stderr and "model.width" in q.stderr


# ---------------------------------------------------------------- in-process task (no subprocess)
def test_epoch_wise_curve_is_the_mean_of_the_histories(tmp_path):
    from regexp.experiments.sweep_task import run_sweep

    cfg = compose_experiment("double_descent_epochs", "model.width=8", "sweep.seeds=[0,1]", *TINY,
                             "trainer.epochs=4", "logger.tensorboard=false")
    validate(cfg)
    result = run_sweep(cfg, tmp_path, [], False)
    assert result["status"] == "completed" and result["points"] == 2
    hist = [json.loads((tmp_path / f"seed={s}" / "metrics.json").read_text())["history"] for s in (0, 1)]
    curve = read_rows(tmp_path / "curve.csv")
    assert [int(c["epoch"]) for c in curve] == [1, 2, 3, 4]
    for c, h0, h1 in zip(curve, *hist):
        assert float(c["test_error_mean"]) == pytest.approx(1 - (h0["test_acc"] + h1["test_acc"]) / 2, abs=1e-12)
        assert float(c["train_error_mean"]) == pytest.approx(1 - (h0["train_acc"] + h1["train_acc"]) / 2, abs=1e-12)
    assert sorted(scalars(tmp_path, "sweep/test_error")) == [1, 2, 3, 4]
    assert is_png(tmp_path / "double_descent_epochs.png")


def test_sweep_config_errors_name_the_key():
    from regexp.experiments.sweep_task import run_sweep

    cfg = compose_experiment("double_descent", "sweep.x=model.depth")
    with pytest.raises(ConfigError, match="sweep.x='model.depth' is invalid.*model.width"):
        run_sweep(cfg, Path("/nonexistent"), [], False)
    cfg = compose_experiment("double_descent", "+extra.plot.colour=red")
    with pytest.raises(ConfigError, match="extra.plot.colour is unknown"):
        run_sweep(cfg, Path("/nonexistent"), [], False)
    cfg = compose_experiment("double_descent", "++sweep.params={model.widht:[4]}", "sweep.x=null")
    with pytest.raises(ConfigError, match="'model.widht' is not in the config"):
        run_sweep(cfg, Path("/nonexistent"), [], False)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_every_point_validates(name):
    from regexp.experiments.sweep_task import sweep_axis

    cfg = compose_experiment(name)
    assert cfg.task == "sweep" and not cfg.trainer.get("early_stopping")
    assert "early_stopping" not in cfg.regularizer  # early stopping would hide the peak
    x = sweep_axis(cfg)
    plot_settings(cfg.extra)
    params = OmegaConf.to_container(cfg.sweep.params)
    for point in grid(params, list(cfg.sweep.seeds)):
        validate(point_config(cfg, point))
    if x != "epoch":
        assert len(params[x]) >= 5  # a curve, not a couple of points


def test_model_wise_default_spans_the_threshold():
    """The MLP widths run from well below params = n_train to well past it."""
    cfg = compose_experiment("double_descent")
    n = train_size(cfg.data)
    params = [w * w + 52 * w + 10 for w in cfg.sweep.params["model.width"]]  # 40→w→w→10 MLP
    assert cfg.data.label_noise >= 0.15 and n == 4000
    assert min(params) < n / 10 and max(params) > 5 * n
    assert sum(p < n for p in params) >= 4 and sum(p > n for p in params) >= 4


# ---------------------------------------------------------------- the mathematics of the curve
def test_threshold_of_a_power_law_is_exact():
    # params = x² crosses n_train = 100 at x = 10; log-log interpolation is exact for a power law.
    pts = [CurvePoint(x, x, 1, {}, {}, params=x * x, n_train=100) for x in (2.0, 5.0, 20.0, 80.0)]
    assert threshold(pts) == pytest.approx(10.0, rel=1e-12)
    # Sample-wise: fixed 1000 parameters, the training set grows through them.
    pts = [CurvePoint(n, n, 1, {}, {}, params=1000, n_train=n) for n in (250.0, 500.0, 2000.0, 4000.0)]
    assert threshold(pts) == pytest.approx(1000.0, rel=1e-12)
    # Weight decay changes neither: no threshold.
    pts = [CurvePoint(l, l, 1, {}, {}, params=4234, n_train=4000) for l in (1e-4, 1e-3, 1e-2)]
    assert threshold(pts) is None


def _pts(xs, means, stds):
    return [CurvePoint(x, x, 2, {"test_error": m}, {"test_error": sd}) for x, m, sd in zip(xs, means, stds)]


def test_bump_is_the_largest_rise_and_the_fall_after_it_against_twice_the_seed_spread():
    # Model-wise shape: falls to 0.50 at x=16, peaks at 0.58 at x=40, falls to 0.48 at x=192.
    pts = _pts([4, 16, 24, 40, 96, 192], [0.70, 0.50, 0.52, 0.58, 0.55, 0.48],
               [0.01, 0.01, 0.02, 0.03, 0.01, 0.02])
    b = bump(pts, "test_error")
    assert (b.trough.x, b.peak.x, b.after.x) == (16, 40, 192)
    assert b.rise == pytest.approx(0.08) and b.rise_spread == pytest.approx(0.03)  # larger std of 16, 40
    assert b.fall == pytest.approx(0.10) and b.fall_spread == pytest.approx(0.03)
    line = format_bump(b)
    assert "(+0.0800) from 16 to 40, seed spread 0.0300: exceeds 2× spread" in line
    assert "falls to 0.4800 (−0.1000) at 192, seed spread 0.0300: exceeds 2× spread" in line
    # A rise of 0.007 against a spread of 0.006 is within twice the spread.
    b = bump(_pts([1750, 2000, 4000], [0.621, 0.628, 0.565], [0.004, 0.006, 0.01]), "test_error")
    assert "(+0.0070) from 1750 to 2000, seed spread 0.0060: within 2× spread" in format_bump(b)


def test_bump_over_one_over_lambda_of_a_u_has_no_second_descent():
    # Error against λ: 0.57 for small λ, best 0.41 at λ=0.01, 0.80 at λ=0.1. Against 1/λ (plotted
    # order) it falls from 0.80 to 0.41 and rises to 0.57 at the smallest λ, the last point.
    pts = _pts([1e-5, 1e-4, 1e-3, 1e-2, 1e-1], [0.57, 0.56, 0.45, 0.41, 0.80], [0.01] * 5)
    b = bump(pts, "test_error", invert_x=True)
    assert (b.trough.x, b.peak.x, b.after) == (1e-2, 1e-5, None) and b.fall == 0.0
    assert format_bump(b).endswith("the peak is the last point")
    # Read by λ itself, the largest rise is the underfitting side: 0.41 at 0.01 -> 0.80 at 0.1.
    b = bump(pts, "test_error")
    assert (b.trough.x, b.peak.x) == (1e-2, 1e-1) and b.rise == pytest.approx(0.39)
    # A curve that only falls has no bump; the λ = 0 point has no place on a 1/λ axis.
    assert bump(_pts([1, 2, 3], [0.9, 0.8, 0.7], [0.0] * 3), "test_error") is None
    b = bump(_pts([0.0, 1e-3, 1e-2], [0.1, 0.6, 0.5], [0.0] * 3), "test_error", invert_x=True)
    assert b.peak.x == 1e-3 and b.after is None


def test_aggregate_averages_completed_seeds_only():
    rows = [
        {"w": 8, "seed": 0, "status": "completed", "test_error": 0.5, "train_error": 0.25, "params": 10},
        {"w": 8, "seed": 1, "status": "completed", "test_error": 0.7, "train_error": 0.35, "params": 10},
        {"w": 8, "seed": 2, "status": "failed", "test_error": "", "train_error": ""},
        {"w": 4, "seed": 0, "status": "diverged", "test_error": 0.9, "train_error": 0.9},
        {"w": 16, "seed": 0, "status": "completed", "test_error": "0.125", "train_error": "0"},  # from a CSV
    ]
    (s,) = aggregate(rows, "w", []).series
    assert [p.x for p in s.points] == [8.0, 16.0]
    p8, p16 = s.points
    assert p8.n == 2 and p8.mean["test_error"] == pytest.approx(0.6) and p8.mean["train_error"] == pytest.approx(0.3)
    assert p8.std["test_error"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert p16.mean == {"test_error": 0.125, "train_error": 0.0} and p16.std["test_error"] == 0.0


def test_a_second_swept_key_splits_the_curve_into_series():
    rows = [{"w": w, "noise": z, "seed": 0, "status": "completed", "test_error": w * z}
            for w in (4, 8) for z in (0.0, 0.2)]
    curve = aggregate(rows, "w", ["noise"])
    assert [s.name for s in curve.series] == ["noise=0.0", "noise=0.2"]
    assert [p.mean["test_error"] for p in curve.series[1].points] == [pytest.approx(0.8), pytest.approx(1.6)]


def test_overrides_parse_to_typed_points():
    assert parse_overrides(["model.width=8", "+experiment=double_descent", "model.channels=[1,2,4,8]",
                            "regularizer.weight_decay.lam=1e-3", "trainer.resume=true", "hydra.run.dir=x"]) == {
        "model.width": 8, "experiment": "double_descent", "model.channels": [1, 2, 4, 8],
        "regularizer.weight_decay.lam": 0.001}


def test_train_size_follows_the_split_rounding():
    cfg = OmegaConf.create({"name": "mnist1d", "n_train": None, "val_fraction": 0.1})
    assert train_size(cfg) == 3600
    assert train_size(OmegaConf.create({"name": "cifar10", "n_train": None, "val_fraction": 0.0})) == 50000
    assert train_size(OmegaConf.create({"name": "mnist1d", "n_train": 750, "val_fraction": 0.1})) == 750


def test_report_plots_list_valued_widths_at_their_first_entry(tmp_path):
    runs = [Run(tmp_path / f"k={k}", {"model.channels": [k, 2 * k], "seed": 0},
                {"status": "completed", "params": 100 * k * k, "final": {"train_acc": 1.0, "test_acc": 0.5 + k / 100,
                                                                          "train_loss": 0.1, "test_loss": 1.0}},
                n_train=1600) for k in (1, 2, 8, 16)]
    curve = report(tmp_path, runs, "model.channels", plot_settings({"plot": {"name": "cnn"}}))
    (s,) = curve.series
    assert [p.x for p in s.points] == [1.0, 2.0, 8.0, 16.0]
    assert s.threshold == pytest.approx(4.0)  # 100 k² = 1600
    assert is_png(tmp_path / "cnn.png")
    assert read_rows(tmp_path / "results.csv")[0]["model.channels"] == "[1, 2]"
