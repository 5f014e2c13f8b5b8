"""``+experiment=gradient_flow``: the modified loss L + (α/4)‖∇L‖² of Barrett & Dherin (2021)
against its closed form on a quadratic, its flow against the gradient-descent iterates, and a
short run's CSVs."""
from __future__ import annotations

import math

import pytest
import torch

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.experiments.gradient_flow import (MODELS, gradient, gradient_descent, gradient_flow,
                                              least_squares, modified_loss)
from regexp.sweep import read_csv
from regexp.tasks import TASKS

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # eigenvalues 1.38 and 3.62
W0 = torch.tensor([1.0, -2.0], dtype=torch.float64)


def quadratic(w):  # L = ½ wᵀAw, ∇L = Aw
    return 0.5 * w @ A @ w


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_modified_gradient_is_aw_plus_half_alpha_a_squared_w(alpha):
    w = torch.tensor([0.7, -1.3], dtype=torch.float64)
    # L̃ = ½wᵀAw + (α/4)‖Aw‖², so ∇L̃ = Aw + (α/2)A²w
    want = A @ w + alpha / 2 * A @ A @ w
    assert gradient(modified_loss(quadratic, alpha), w).tolist() == pytest.approx(want.tolist(), rel=1e-12)
    assert gradient(quadratic, w).tolist() == pytest.approx((A @ w).tolist(), rel=1e-12)


def test_rk4_flow_is_the_matrix_exponential():
    t = 1.3
    got = gradient_flow(quadratic, W0, t, 200)
    assert got.shape == (201, 2) and got[0].tolist() == W0.tolist()
    want = torch.linalg.matrix_exp(-A * t) @ W0
    assert got[-1].tolist() == pytest.approx(want.tolist(), abs=1e-10)


def test_modified_flow_matches_gradient_descent_to_higher_order():
    time = 1.0
    errors = {}
    for alpha in (0.1, 0.05, 0.025):
        k = round(time / alpha)
        gd = gradient_descent(quadratic, W0, alpha, k)
        exact = torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) - alpha * A, k) @ W0
        assert gd[-1].tolist() == pytest.approx(exact.tolist(), rel=1e-12)  # w_k = (I − αA)^k w0
        plain = gradient_flow(quadratic, W0, time, 4 * k)[-1]
        modified = gradient_flow(modified_loss(quadratic, alpha), W0, time, 4 * k)[-1]
        errors[alpha] = (float((plain - exact).norm()), float((modified - exact).norm()))
        assert errors[alpha][1] < errors[alpha][0] / 3
    for big, small in ((0.1, 0.05), (0.05, 0.025)):
        plain_ratio = errors[big][0] / errors[small][0]
        modified_ratio = errors[big][1] / errors[small][1]
        assert 1.6 < plain_ratio < 2.5  # the plain flow is first order in α
        assert 3.2 < modified_ratio < 5.0  # the modified flow is second order


def run(compose_cfg, overrides, out):
    cfg = compose_cfg(["+experiment=gradient_flow", *overrides])
    validate(cfg)
    return TASKS["gradient_flow"](cfg, out, list(overrides), False)


QUICK = ["extra.steps=12", "extra.substeps=2", "extra.alpha_fractions=[1.0,0.5]", "extra.grid=20"]


def test_run_writes_the_three_paths_and_their_distances(compose_cfg, tmp_path):
    metrics = run(compose_cfg, QUICK, tmp_path)
    assert metrics["status"] == "completed"
    assert (tmp_path / "gradient_flow.png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "figures/gradient_flow" in acc.Tags()["images"]

    rows = read_csv(tmp_path / "paths.csv")
    paths = {name: [r for r in rows if r["path"] == name]
             for name in ("gradient descent", "gradient flow", "modified flow")}
    assert sum(map(len, paths.values())) == len(rows)
    model = MODELS["product"]
    surface = least_squares(model, 10, 0.1, 0)
    want = gradient_descent(lambda w: surface(w[0], w[1]), torch.tensor(model.start, dtype=torch.float64),
                            model.alpha, 12)
    gd = [[float(r["phi0"]), float(r["phi1"])] for r in paths["gradient descent"]]
    assert gd == [pytest.approx(p, rel=1e-9) for p in want.tolist()]
    for name, mine in paths.items():
        assert [int(r["step"]) for r in mine] == list(range(13))
        assert [float(r["time"]) for r in mine] == pytest.approx([0.1 * k for k in range(13)])
        for r, g in zip(mine, gd):  # distance at the matched time kα
            w = [float(r["phi0"]), float(r["phi1"])]
            assert float(r["distance_to_gd"]) == pytest.approx(math.dist(w, g), abs=1e-12)
            assert float(r["loss"]) == pytest.approx(float(surface(torch.tensor(w[0]), torch.tensor(w[1]))))
    assert mine[0]["phi0"] == paths["gradient descent"][0]["phi0"]  # all start together

    # φ0·φ1·x: the flow conserves φ0² − φ1² (d/dt = 2φ0φ1(∂L/∂u − ∂L/∂u) = 0); each descent step
    # multiplies it by 1 − α²(∂L/∂u)², so descent drifts toward balanced, flatter minima.
    balance = {name: [float(r["phi0"]) ** 2 - float(r["phi1"]) ** 2 for r in mine] for name, mine in paths.items()}
    assert all(b < a for a, b in zip(balance["gradient descent"], balance["gradient descent"][1:]))
    gd_drift = balance["gradient descent"][0] - balance["gradient descent"][-1]
    assert max(abs(b - balance["gradient flow"][0]) for b in balance["gradient flow"]) < 0.01 * gd_drift  # RK4 error

    dist = read_csv(tmp_path / "distances.csv")
    assert [(r["alpha"], r["steps"], r["flow"]) for r in dist] == [
        ("0.1", "12", "gradient flow"), ("0.1", "12", "modified flow"),
        ("0.05", "24", "gradient flow"), ("0.05", "24", "modified flow")]
    gap = {(r["alpha"], r["flow"]): float(r["max_distance"]) for r in dist}
    by_row = max(float(r["distance_to_gd"]) for r in paths["gradient flow"])
    assert gap["0.1", "gradient flow"] == pytest.approx(by_row)
    for a in ("0.1", "0.05"):
        assert 0 < gap[a, "modified flow"] < gap[a, "gradient flow"]  # the modified flow tracks GD closer
    assert gap["0.05", "gradient flow"] < gap["0.1", "gradient flow"]
    assert metrics["max_distance"]["modified flow"] == pytest.approx(gap["0.1", "modified flow"])


@pytest.mark.parametrize("override,message", [
    ("+extra.alpah=0.1", r"extra\.alpah is invalid for task=gradient_flow: expected one of .*extra\.alpha"),
    ("extra.alpha=-1", r"extra\.alpha=-1\.0 is invalid: expected a number > 0"),
    ("extra.model=rosenbrock", r"extra\.model='rosenbrock' is invalid: expected values among product, gabor"),
    ("extra.start=[1.0]", r"extra\.start=\[1\.0\] is invalid"),
    ("extra.alpha_fractions=[2.0]", r"extra\.alpha_fractions=\[2\.0\] is invalid"),
    ("extra.alpha=50", r"extra\.alpha=50\.0 is invalid: expected a smaller step"),
])
def test_bad_settings_are_refused_by_name(compose_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(compose_cfg, [*QUICK, override], tmp_path)


def test_composes_into_its_task(compose_cfg):
    cfg = compose_cfg(["+experiment=gradient_flow"])
    validate(cfg)
    assert cfg.task == "gradient_flow" and cfg.extra.model == "product"
