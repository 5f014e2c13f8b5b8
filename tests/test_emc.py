"""Effective model complexity (Nakkiran et al. 2019): the maths on procedures whose EMC is known,
bad inputs, ``extra.emc`` of a tiny sweep end to end, and the sweep report's EMC and curvature
columns."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from regexp.analysis.collect import Run, metrics_of
from regexp.analysis.emc import EMC, emc_from_errors, emc_search, geometric_sizes, model_key
from regexp.analysis.report import plot_settings, report
from regexp.config import register_configs, validate
from regexp.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows_of(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def least_squares_error(p: int, seed: int = 0):
    """T(S) = minimum-norm least squares with p random features on n points with random targets;
    its train error is the fraction of points it does not fit (|residual| > 1e-6). For n ≤ p
    generic features interpolate every target, for n > p almost no point is fit: EMC_0 = p."""
    g = torch.Generator().manual_seed(seed)
    X_all = torch.randn(400, p, generator=g, dtype=torch.float64)
    y_all = torch.randn(400, generator=g, dtype=torch.float64)

    def error(n: int) -> float:
        X, y = X_all[:n], y_all[:n]
        w = torch.linalg.pinv(X) @ y
        return float(((X @ w - y).abs() > 1e-6).double().mean())

    return error


def test_bisection_finds_the_least_squares_capacity_exactly():
    f = least_squares_error(p=37)
    e = emc_search(f, lo=1, hi=400, eps=0.0)
    assert (e.lower, e.upper, e.value, e.censored) == (37, 38, 37, False)


def test_grid_brackets_the_least_squares_capacity():
    f = least_squares_error(p=37)
    e = emc_from_errors({n: f(n) for n in (10, 20, 37, 38, 80)}, eps=0.0)
    assert (e.lower, e.upper) == (37, 38)


def test_capacity_procedure_hand_computed():
    """A procedure that fits C = 90 of any n points: error max(0, 1 − C/n) ≤ 0.1 ⇔ n ≤ C/0.9 = 100."""
    calls = []

    def f(n):
        calls.append(n)
        return max(0.0, 1 - 90 / n)

    e = emc_search(f, lo=1, hi=1000, eps=0.1)
    assert (e.lower, e.upper) == (100, 101)
    assert len(calls) <= 2 + math.ceil(math.log2(1000))  # bisection, not a scan
    g = emc_from_errors({n: f(n) for n in (45, 90, 180, 360)}, eps=0.1)
    assert (g.lower, g.upper) == (90, 180)
    # the crossing of ε on log n between (90, 0) and (180, 0.5): log n = log 90 + (0.1/0.5) log 2
    assert g.estimate == pytest.approx(90 * 2 ** 0.2, rel=1e-12)


def test_estimate_is_the_geometric_midpoint_of_a_symmetric_bracket():
    assert emc_from_errors({100: 0.0, 400: 0.2}, eps=0.1).estimate == pytest.approx(200.0, rel=1e-12)


def test_censored_ends_and_a_dip_back_under_eps():
    assert emc_from_errors({10: 0.0, 20: 0.05}) == EMC(20, None, None)  # EMC ≥ 20
    assert emc_from_errors({10: 0.5, 20: 0.6}) == EMC(None, 10, None)  # EMC < 10
    assert emc_from_errors({10: 0.5, 20: 0.6}).censored
    # the definition is the LARGEST n that passes, even after a failing one
    assert emc_from_errors({100: 0.0, 200: 0.3, 400: 0.05}) == EMC(400, None, None)
    assert emc_search(lambda n: 0.0, 5, 50) == EMC(50, None, None)
    assert emc_search(lambda n: 1.0, 5, 50) == EMC(None, 5, None)


@pytest.mark.parametrize("call, message", [
    (lambda: emc_from_errors({}), "errors is empty"),
    (lambda: emc_from_errors({10: 0.0}, eps=-0.1), r"eps=-0.1 is invalid: expected a train error in \[0, 1\)"),
    (lambda: emc_from_errors({10: 0.0}, eps=1.0), "eps=1.0 is invalid"),
    (lambda: emc_from_errors({10: 0.0}, eps="a"), "eps='a' is invalid"),
    (lambda: emc_from_errors({0: 0.0}), "n=0 is invalid: expected a whole number"),
    (lambda: emc_from_errors({2.5: 0.0}), "n=2.5 is invalid"),
    (lambda: emc_from_errors({10: float("nan")}), r"train error nan at n=10 is invalid: expected a number in \[0, 1\]"),
    (lambda: emc_from_errors({10: 1.5}), "train error 1.5 at n=10 is invalid"),
    (lambda: emc_search(lambda n: 0.0, 50, 5), "hi=5 is invalid: expected hi >= lo=50"),
    (lambda: emc_search(lambda n: -1.0, 5, 50), "train error -1.0 at n=5 is invalid"),
    (lambda: geometric_sizes(100, 10, 3), "hi=10 is invalid"),
    (lambda: geometric_sizes(10, 100, 0), "count=0 is invalid"),
])
def test_bad_inputs_name_what_is_wrong(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_geometric_sizes():
    assert geometric_sizes(250, 4000, 5) == [250, 500, 1000, 2000, 4000]
    assert geometric_sizes(7, 7, 3) == [7]


def test_metrics_of_keeps_the_probe_columns():
    m = metrics_of({"status": "completed", "probes.hessian/top1": 2.5, "probes.hessian/trace": 40.0})
    assert m["probes"] == {"hessian/top1": 2.5, "hessian/trace": 40.0}


def test_report_adds_curvature_and_emc_beside_the_errors(tmp_path):
    """Fake runs: two widths × two seeds with probe values; the curve's means are the hand means."""
    def run(w, seed, top, trace, test_acc):
        return Run(tmp_path / f"model.width={w},seed={seed}", {"model.width": w, "seed": seed},
                   {"status": "completed", "params": 10 * w,
                    "final": {"train_acc": 1.0, "test_acc": test_acc, "train_loss": 0.1, "test_loss": 1.0},
                    "probes": {"hessian/top1": top, "hessian/trace": trace}}, n_train=100)

    runs = [run(4, 0, 2.0, 20.0, 0.6), run(4, 1, 4.0, 30.0, 0.7), run(16, 0, 1.0, 10.0, 0.8), run(16, 1, 3.0, 12.0, 0.9)]
    emc = {model_key({"model.width": 4}): {"emc": 60.0, "censored": False},
           model_key({"model.width": 16}): {"emc": 100.0, "censored": True}}
    curve = report(tmp_path, runs, "model.width", plot_settings({"plot": {"name": "dd"}}), emc=emc)
    p4, p16 = curve.series[0].points
    assert p4.mean["probes.hessian/top1"] == pytest.approx(3.0)
    assert p4.std["probes.hessian/top1"] == pytest.approx(math.sqrt(2.0))  # sample std of 2 and 4
    assert p16.mean["probes.hessian/trace"] == pytest.approx(11.0)
    assert (p4.emc, p4.emc_censored, p16.emc, p16.emc_censored) == (60.0, False, 100.0, True)
    curve_rows = rows_of(tmp_path / "curve.csv")
    assert [float(r["probes.hessian/top1_mean"]) for r in curve_rows] == pytest.approx([3.0, 2.0])
    assert [float(r["probes.hessian/trace_mean"]) for r in curve_rows] == pytest.approx([25.0, 11.0])
    assert [r["emc"] for r in curve_rows] == ["60.0", "100.0"]
    assert [r["emc_censored"] for r in curve_rows] == ["False", "True"]
    results = rows_of(tmp_path / "results.csv")
    assert [r["probes.hessian/top1"] for r in results] == ["2.0", "4.0", "1.0", "3.0"]
    assert [r["emc"] for r in results] == ["60.0", "60.0", "100.0", "100.0"]
    for name in ("dd.png", "dd_emc.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def compose_experiment(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=["+experiment=double_descent", *overrides])


TINY = ["'sweep.params={model.width:[2,32]}'", "sweep.seeds=[0]", "data.n_train=120", "data.n_test=100",
        "trainer.epochs=25", "trainer.eval_every=25", "trainer.batch_size=20", "logger.tensorboard=false",
        "data.label_noise=0.0", "optimizer.lr=0.05"]


def test_extra_emc_of_a_tiny_sweep_is_its_runs_train_errors(tmp_path):
    from regexp.experiments.sweep_task import run_sweep

    cfg = compose_experiment(*[o.strip("'") for o in TINY], "+extra.emc={n_train:[20,60],eps:0.1}")
    validate(cfg)
    assert run_sweep(cfg, tmp_path, [], False)["status"] == "completed"
    table = {int(r["model.width"]): r for r in rows_of(tmp_path / "emc.csv")}
    for w, row in table.items():
        errors = {}
        for n, folder in ((20, f"emc/data.n_train=20,model.width={w},seed=0"),
                          (60, f"emc/data.n_train=60,model.width={w},seed=0"), (120, f"model.width={w},seed=0")):
            final = json.loads((tmp_path / folder / "metrics.json").read_text())["final"]
            errors[n] = 1 - final["train_acc"]
            assert float(row[f"train_error@{n}"]) == pytest.approx(errors[n], abs=1e-12)
        e = emc_from_errors(errors, 0.1)
        assert row["emc"] == ("" if e.lower is None else str(e.lower))
        assert row["emc_censored"] == str(e.censored)
        curve = {int(r["model.width"]): r for r in rows_of(tmp_path / "curve.csv")}
        expected = e.estimate if e.estimate is not None else e.lower
        if expected is not None:
            assert float(curve[w]["emc"]) == pytest.approx(expected)
    # the tiny sweep spans capacities: the wide model fits all 120 points, the 2-unit one does not
    assert table[32]["emc"] == "120" and table[2]["emc"] != "120"
    assert (tmp_path / "double_descent_emc.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("override, message", [
    ("+extra.emc={n_train:[120]}", r"extra.emc.n_train=\[120\] is invalid: expected sizes below the sweep's own"),
    ("+extra.emc={n_train:[]}", "extra.emc.n_train=.* is invalid: expected a non-empty list"),
    ("+extra.emc={n_train:[10],size:3}", "extra.emc.size is unknown"),
    ("+extra.emc={n_train:[10],eps:1.5}", r"extra.emc.eps=1.5 is invalid"),
])
def test_extra_emc_bad_settings(tmp_path, override, message):
    from regexp.experiments.sweep_task import run_sweep

    cfg = compose_experiment(*[o.strip("'") for o in TINY], override)
    with pytest.raises(ConfigError, match=message):
        run_sweep(cfg, tmp_path, [], False)
    assert not any(tmp_path.iterdir())  # refused before training anything


def test_lookup_matches_a_collected_run_that_carries_the_sweeps_own_overrides():
    from regexp.analysis.emc import lookup

    table = {model_key({"model.width": 8}): "w8", model_key({"model.width": 16}): "w16"}
    assert lookup(table, {"model.width": 16, "seed": 1}) == "w16"  # the sweep's own point
    collected = {"model.width": 8, "seed": 0, "experiment": "double_descent", "extra.emc": {"n_train": [10]}}
    assert lookup(table, collected) == "w8"  # plot_sweep: the folder's overrides ride along
    assert lookup(table, {"model.width": 32, "seed": 0}) is None
