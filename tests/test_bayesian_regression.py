"""Bayesian linear regression: the posterior against closed forms, MAP == posterior mean, the CLI."""
from __future__ import annotations

import math

import pytest
import torch

from regexp.experiments.bayesian_regression import (Settings, features, log_evidence, map_fit, posterior,
                                                    predictive, sample_functions)
from regexp.sweep import read_csv
from tests.test_gallery import assert_png, run, tb_images


def tiny():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 1, generator=g)
    y = torch.sin(2 * math.pi * x) + 0.1 * torch.randn(5, 1, generator=g)
    return features(x, Settings(n_features=3, rbf_width=0.3)), y


def test_features_are_the_bumps_or_hinges_and_a_constant():
    x = torch.tensor([[0.0], [0.3]])
    rbf = features(x, Settings(n_features=3, rbf_width=0.5))
    assert rbf[1].tolist() == pytest.approx([math.exp(-0.36), math.exp(-0.16), math.exp(-1.96), 1.0])
    relu = features(x, Settings(features="relu", n_features=3))
    assert relu[1].tolist() == pytest.approx([0.3, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("prior_var", [0.05, 2.0])
def test_posterior_is_the_closed_form_and_its_function_space_twin(prior_var):
    phi, y = tiny()
    s2 = 0.04
    post = posterior(phi, y, s2, prior_var)
    # Prince §9.3.5 as written: Σ = (ΦᵀΦ/σ² + I/σ_p²)⁻¹, μ = ΣΦᵀy/σ²
    cov = torch.linalg.inv(phi.T @ phi / s2 + torch.eye(4, dtype=phi.dtype) / prior_var)
    mean = cov @ phi.T @ y.double().squeeze(1) / s2
    assert torch.allclose(post.cov, cov, atol=1e-10) and torch.allclose(post.mean, mean, atol=1e-10)
    # the same Gaussian by conditioning the joint of (w, y): K = σ_p²ΦΦᵀ + σ²I (Woodbury)
    k = prior_var * phi @ phi.T + s2 * torch.eye(5, dtype=phi.dtype)
    gain = prior_var * phi.T @ torch.linalg.inv(k)
    assert torch.allclose(post.mean, gain @ y.double().squeeze(1), atol=1e-10)
    assert torch.allclose(post.cov, prior_var * torch.eye(4, dtype=phi.dtype) - gain @ phi * prior_var, atol=1e-10)
    x_new = phi[:2] * 0.7
    m, v = predictive(post, x_new, s2)
    for i in range(2):
        assert float(m[i]) == pytest.approx(float(x_new[i] @ mean))
        assert float(v[i]) == pytest.approx(s2 + float(x_new[i] @ cov @ x_new[i]))
    direct = -0.5 * (y.double().squeeze(1) @ torch.linalg.solve(k, y.double().squeeze(1))
                     + torch.logdet(k) + 5 * math.log(2 * math.pi))
    assert log_evidence(phi, y, s2, prior_var) == pytest.approx(float(direct))


@pytest.mark.parametrize("prior_var", [0.05, 2.0, 100.0])
def test_map_with_l2_lambda_noise_over_prior_is_the_posterior_mean(prior_var):
    phi, y = tiny()
    w = map_fit(phi, y, 0.04 / prior_var)
    assert torch.allclose(w, posterior(phi, y, 0.04, prior_var).mean, atol=1e-7)
    # and another λ is not: the equivalence is specific to λ = σ²/σ_p²
    assert (map_fit(phi, y, 4 * 0.04 / prior_var) - w).abs().max() > 1e-3


def test_posterior_samples_are_mean_plus_a_square_root_of_the_covariance():
    phi, y = tiny()
    post = posterior(phi, y, 0.04, 1.0)
    grid = torch.eye(4, dtype=phi.dtype)  # the identity as "features": the samples are the weights
    w = sample_functions(post, grid, 20000, torch.Generator().manual_seed(0))
    assert torch.allclose(w.mean(0), post.mean, atol=0.02)
    assert torch.allclose(torch.cov(w.T), post.cov, atol=0.02 * float(post.cov.abs().max()))


def test_bayesian_regression_cli_writes_posterior_and_bands(compose_cfg, tmp_path):
    overrides = ["extra.steps=40", "extra.ensemble=2", "extra.mc_samples=4", "extra.grid=30",
                 "extra.prior_variances=[0.1,10]", "extra.n_features=6", "model.width=8", "trainer.threads=1"]
    run(compose_cfg, "bayesian_regression", overrides, tmp_path)
    assert_png(tmp_path / "posterior.png")
    assert "figures/posterior" in tb_images(tmp_path)
    summary = {r["method"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert list(summary) == ["posterior σ_p²=0.1", "posterior σ_p²=10", "bagging (2 models)",
                             "MC dropout (4 samples)"]
    for name, prior_var in (("posterior σ_p²=0.1", 0.1), ("posterior σ_p²=10", 10.0)):
        assert float(summary[name]["lambda"]) == pytest.approx(0.04 / prior_var)
        assert float(summary[name]["map_max_weight_diff"]) < 1e-6
    curves = read_csv(tmp_path / "curves.csv")
    assert len(curves) == 30
    for r in curves:
        # predictive variance = noise + epistemic
        for name in ("posterior σ_p²=0.1", "posterior σ_p²=10"):
            assert float(r[f"{name} std"]) ** 2 == pytest.approx(0.04 + float(r[f"{name} epistemic std"]) ** 2)
        assert float(r["MC dropout (4 samples) std"]) > 0
    # a weaker prior leaves the function less certain everywhere
    assert all(float(r["posterior σ_p²=10 epistemic std"]) > float(r["posterior σ_p²=0.1 epistemic std"])
               for r in curves)


def test_bayesian_regression_refuses_bad_settings(compose_cfg, tmp_path):
    from regexp.errors import ConfigError

    with pytest.raises(ConfigError, match="extra.prior_variances"):
        run(compose_cfg, "bayesian_regression", ["extra.prior_variances=[0.0]"], tmp_path)
    with pytest.raises(ConfigError, match="extra.features"):
        run(compose_cfg, "bayesian_regression", ["extra.features=poly"], tmp_path)
