"""Goodfellow §7.11: an ensemble's squared error is v/k + (k − 1)c/k; logged and reproduced."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.regularizers.ensemble import Ensemble, _error_terms
from regexp.regularizers.ensemble_error import decomposition, probability_errors
from regexp.sweep import read_csv
from tests.test_gallery import QUICK, assert_png, run, tb_images


def by_hand(errors):
    """v, c and the ensemble's squared error written as loops over members and examples."""
    k, n = len(errors), len(errors[0])
    sq = lambda a: sum(t * t for t in a)  # noqa: E731
    dot = lambda a, b: sum(s * t for s, t in zip(a, b))  # noqa: E731
    v = sum(sq(errors[i][j]) for i in range(k) for j in range(n)) / (k * n)
    pairs = [(i, l) for i, l in itertools.product(range(k), repeat=2) if i != l]
    c = sum(dot(errors[i][j], errors[l][j]) for i, l in pairs for j in range(n)) / (len(pairs) * n)
    mean = [[sum(errors[i][j][d] for i in range(k)) / k for d in range(len(errors[0][0]))] for j in range(n)]
    return v, c, sum(sq(m) for m in mean) / n


@pytest.mark.parametrize("k", [2, 3, 5])
def test_decomposition_is_exact_on_constructed_member_errors(k):
    g = torch.Generator().manual_seed(k)
    shared = torch.randn(7, 3, generator=g)  # a common part: correlated members (c > 0)
    errors = 0.8 * shared + torch.randn(k, 7, 3, generator=g)
    d = decomposition(errors)
    v, c, measured = by_hand(errors.double().tolist())
    assert d["v"] == pytest.approx(v) and d["c"] == pytest.approx(c) and d["measured"] == pytest.approx(measured)
    assert d["measured"] == pytest.approx(v / k + (k - 1) * c / k, rel=1e-12)
    assert d["theory"] == pytest.approx(d["measured"], rel=1e-12)


def test_decomposition_limits_independent_and_identical_members():
    e = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # orthogonal over the examples: c = 0
    d = decomposition(e)
    assert (d["v"], d["c"], d["measured"]) == pytest.approx((1.0, 0.0, 0.5))  # v/k
    d = decomposition(torch.tensor([[2.0, -1.0]] * 4))  # identical members: c = v, no gain
    assert (d["v"], d["c"], d["measured"]) == pytest.approx((2.5, 2.5, 2.5))
    assert decomposition(torch.tensor([[2.0, -1.0]]))["measured"] == pytest.approx(2.5)


def test_probability_errors_are_brier_vectors_and_the_ensemble_logs_their_terms():
    probs = torch.tensor([[[0.7, 0.2, 0.1]], [[0.1, 0.1, 0.8]]])
    e = probability_errors(probs, torch.tensor([0]))
    assert torch.allclose(e, torch.tensor([[[-0.3, 0.2, 0.1]], [[-0.9, 0.1, 0.8]]]))
    torch.manual_seed(0)
    members = [nn.Linear(4, 3) for _ in range(3)]
    model = Ensemble(members)
    model.train()  # the report must evaluate in eval mode and restore training mode
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    out = _error_terms(model, x, y, "test")
    assert model.training
    p = [F.softmax(m(x), 1).detach() for m in members]
    err = [(q - F.one_hot(y, 3)).tolist() for q in p]
    v, c, measured = by_hand(err)
    assert out == pytest.approx({"ensemble/test_member_sq_error": v, "ensemble/test_member_error_cov": c,
                                 "ensemble/test_sq_error": measured,
                                 "ensemble/test_sq_error_v_c": v / 3 + 2 * c / 3})
    mean_p = torch.stack(p).mean(0)  # the ensemble's own probability gives the same squared error
    assert measured == pytest.approx(float((mean_p - F.one_hot(y, 3)).pow(2).sum(1).mean()))


def test_ensemble_theory_cli_members_curves_and_figure(compose_cfg, tmp_path):
    overrides = [*QUICK, "trainer.epochs=1", "extra.members=2", "extra.reps=[0]",
                 "extra.models=[{model.width: 8},{model.width: 16}]", "model.width=8", "model.depth=1"]
    run(compose_cfg, "ensemble_theory", overrides, tmp_path)
    assert_png(tmp_path / "ensemble.png")
    assert "figures/ensemble" in tb_images(tmp_path)
    members = read_csv(tmp_path / "members.csv")
    assert [(m["variant"], m["seed"]) for m in members] == [(v, s) for v in ("inits", "bagging", "models")
                                                            for s in ("0", "1")]
    # bagging changes the data only: its member 0 starts from the weights of inits' member 0
    a = torch.load(tmp_path / "inits/rep=0/seed=0/init_model.pt", weights_only=True)
    b = torch.load(tmp_path / "bagging/rep=0/seed=0/init_model.pt", weights_only=True)
    assert all(torch.equal(t, b.get(k, b.get(f"members.0.{k}"))) for k, t in a.items())
    assert [m.get("model.width") for m in members if m["variant"] == "models"] == ["8", "16"]
    curves = read_csv(tmp_path / "curves.csv")
    assert len(curves) == 3 * 2
    for r in curves:
        assert float(r["measured"]) == pytest.approx(float(r["v_c"]), rel=1e-9)
        if r["k"] == "2":
            assert float(r["v_c_all"]) == pytest.approx(float(r["measured"]), rel=1e-9)
        else:  # one member: its own squared error
            mine = [m for m in members if m["variant"] == r["variant"] and m["member"] == "0"][0]
            assert float(r["measured"]) == pytest.approx(float(mine["sq_error"]), rel=1e-9)
    summary = read_csv(tmp_path / "summary.csv")
    assert [s["variant"] for s in summary] == ["inits", "bagging", "models"]
