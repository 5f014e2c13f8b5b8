"""Soft weight sharing in a population: each member's own mixture, trained with its weights.

Tolerance as in test_population.py: parameters within |a - b| <= 1e-5 + 1e-4·|b| (float32, only
the summation order inside the batched products differs), logged metrics within a relative 1e-4.
The stacked penalty is compared with the lone one within float32 rounding of a sum over a few
thousand weights (rtol 1e-5).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from test_population import ATOL, BASE, RTOL, _assert_same_run, _pop_and_lone
from test_population_stop_transfer import _interrupt_resume_and_lone
from regexp.models.mlp import MLP
from regexp.population import train_population
from regexp.population.compat import incompatibility
from regexp.population.mixture import PARAMS, StackedMixtures
from regexp.population.stacked_mlp import StackedMLP
from regexp.regularizers.base import Context
from regexp.regularizers.soft_weight_sharing import SoftWeightSharing
from regexp.sweep import point_name

# half test_population's data set: each test stays under 20 s on a loaded 2-core machine
SWS = ["regularizer=[soft_weight_sharing]", "regularizer.soft_weight_sharing.components=4", "data.n_train=600"]


def _lone_member(width: int, seed: int, tau: float, **cfg) -> SimpleNamespace:
    """A lone MLP with its attached regularizer, its mixture moved off its start (so that every
    component matters)."""
    torch.manual_seed(seed)
    model = MLP(40, 10, width, 2, "relu")
    reg = SoftWeightSharing(OmegaConf.structured(SoftWeightSharing.Config(components=4, tau=tau, **cfg)),
                            Context(10, 500, torch.device("cpu")))
    reg.attach(model)
    with torch.no_grad():
        for p in reg.mixture.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return SimpleNamespace(model=model, regs=[reg])


@pytest.mark.parametrize("cfg", [{}, {"zero_component": True, "gamma_alpha": 2.0, "gamma_beta": 0.1},
                                 {"include_biases": True, "layers": ["hidden.3", "head"]}])
def test_stacked_penalty_equals_each_members_lone_penalty_value_and_gradient(cfg):
    _check_stacked_penalty([dict(cfg)] * 3)


def test_members_own_pi0_and_hyperprior_enter_as_their_lone_penalties():
    """π₀ and the Gamma hyperprior's α, β per member (α = 0: that member has none)."""
    own = [{"pi0": 0.99, "gamma_alpha": 0.0, "gamma_beta": 0.0}, {"pi0": 0.9, "gamma_alpha": 2.0, "gamma_beta": 0.1},
           {"pi0": 0.5, "gamma_alpha": 1.3, "gamma_beta": 0.7}]
    mix = _check_stacked_penalty([{"zero_component": True, **o} for o in own])
    assert all(torch.is_tensor(mix.shared[k]) for k in ("pi0", "gamma_alpha", "gamma_beta"))


def _check_stacked_penalty(cfgs):
    # three widths padded to 16: a padded (zero) weight would add -ln p(0) to the penalty and
    # pull the mixture towards 0 if it were not masked
    members = [_lone_member(w, s, tau, **cfg) for (w, s, tau), cfg in zip(((5, 0, 0.01), (16, 1, 0.003), (9, 2, 0.05)),
                                                                          cfgs)]
    net = StackedMLP([m.model for m in members], [5, 16, 9], 16, "relu", torch.device("cpu"))
    mix = StackedMixtures(members, net, "sgd", {"lr": [0.1] * 3, "momentum": [0.0] * 3, "dampening": [0.0] * 3},
                          False, False, torch.device("cpu"))
    stacked = mix.penalty(net)
    stacked.sum().backward()
    masks = net.param_masks()
    for k, m in enumerate(members):
        reg = m.regs[0]
        mixture = reg.mixture  # the formula on the member's own weights and mixture, alone
        lone = reg.penalty_of(reg.params, reg.hypers(reg.lam, mixture.free_mu, mixture.xi, mixture.eta), False)
        lone.backward()
        torch.testing.assert_close(stacked[k], lone, rtol=1e-5, atol=0)
        grads = net.member_state(k, [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.params])
        for name, p in m.model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-9)
        for name, p in zip(PARAMS, mix.params):
            torch.testing.assert_close(p.grad[k, 0], getattr(reg.mixture, name).grad, rtol=1e-5, atol=1e-9)
    for p, mask in zip(net.params, masks):  # padding gets no gradient
        if p.grad is not None:
            assert bool((p.grad[~mask] == 0).all())
    return mix


def _same_mixture(tmp_path, point) -> None:
    name = point_name(point)
    cp, cl = (torch.load(tmp_path / d / name / "checkpoint.pt", weights_only=True) for d in ("pop", "lone"))
    (mp,), (ml,) = cp["regularizers"], cl["regularizers"]
    for key in ml["mixture"]:
        torch.testing.assert_close(mp["mixture"][key], ml["mixture"][key], atol=ATOL, rtol=RTOL)
    assert [g["lr"] for g in cp["optimizer"]["param_groups"]] == pytest.approx(
        [g["lr"] for g in cl["optimizer"]["param_groups"]])


@pytest.mark.parametrize("opt", ["adam", "momentum"])
def test_members_with_their_own_mixtures_match_lone_runs(compose_cfg, tmp_path, opt):
    # widths, τ (λ), the mixture's lr and its start differ per member; Adam's state and the
    # cosine schedule act on the mixture's group as torch's optimizer does
    points = [{"model.width": 8, "seed": 0, "regularizer.soft_weight_sharing.tau": 0.01,
               "regularizer.soft_weight_sharing.lr": 0.01},
              {"model.width": 12, "seed": 1, "regularizer.soft_weight_sharing.tau": 0.002,
               "regularizer.soft_weight_sharing.lr": 0.003, "regularizer.soft_weight_sharing.init_sigma": 0.05,
               "regularizer.soft_weight_sharing.pi0": 0.9, "regularizer.soft_weight_sharing.gamma_alpha": 2.0,
               "regularizer.soft_weight_sharing.gamma_beta": 0.01},
              {"model.width": 10, "seed": 2, "regularizer.soft_weight_sharing.tau": 0.05,
               "regularizer.soft_weight_sharing.lr": 0.001}]
    extra = (["regularizer.soft_weight_sharing.zero_component=true", "regularizer.soft_weight_sharing.quantize=true"]
             if opt == "adam" else ["optimizer.lr=0.05"])
    points = points[:2] if opt == "adam" else points  # the quantized report's figures take time
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [f"optimizer={opt}", "scheduler=cosine"] + SWS + extra,
                                 points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # weights, history, extra (π, μ, σ ...), scalars, checkpoint
        _same_mixture(tmp_path, p)
    assert "soft_weight_sharing/mu_1" in pop[0]["extra"]
    assert len({m["extra"]["soft_weight_sharing/mu_1"] for m in pop}) == len(points)  # each its own mixture


def test_population_with_mixtures_resumes_exactly(compose_cfg, tmp_path, monkeypatch):
    """SIGTERM in the middle of epoch 2: each member's checkpoint carries its mixture and the
    mixture's Adam state; the re-launched population ends where the lone uninterrupted runs end
    (the stated tolerance) and, bitwise, where the uninterrupted population ends."""
    points = [{"model.width": 8, "seed": 0, "regularizer.soft_weight_sharing.tau": 0.01},
              {"model.width": 12, "seed": 1, "regularizer.soft_weight_sharing.tau": 0.003,
               "regularizer.soft_weight_sharing.lr": 0.003}]
    overrides = ["optimizer=adam", "trainer.epochs=3"] + SWS
    _, resumed, lone = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, overrides, points, 1)
    for p, a, b in zip(points, resumed, lone):
        for k in b["extra"]:
            assert a["extra"][k] == pytest.approx(b["extra"][k], rel=RTOL, abs=1e-6), k
        _same_mixture(tmp_path, p)
    whole = train_population(compose_cfg(BASE + ["trainer.batch_size=100"] + overrides), points, tmp_path / "whole")
    for p, a, b in zip(points, resumed, whole):
        assert a["extra"] == b["extra"]
        for d in ("model.pt", "checkpoint.pt"):
            sa, sb = (torch.load(tmp_path / run / point_name(p) / d, weights_only=True) for run in ("pop", "whole"))
            if d == "checkpoint.pt":
                sa, sb = sa["regularizers"][0]["mixture"], sb["regularizers"][0]["mixture"]
            assert all(torch.equal(sa[k], sb[k]) for k in sb)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_members_with_mixtures_match_lone_sam_runs(compose_cfg, tmp_path, adaptive):
    # the lone SAM's parameters are every group of its optimizer: the ascent moves each member's
    # mixture (μ, ξ, η) with its weights, under one norm; radii, τ and the mixture's lr differ
    points = [{"model.width": 8, "seed": 0, "optimizer.rho": 0.1, "regularizer.soft_weight_sharing.tau": 0.01},
              {"model.width": 12, "seed": 1, "optimizer.rho": 0.3, "regularizer.soft_weight_sharing.tau": 0.003,
               "regularizer.soft_weight_sharing.lr": 0.003}]
    base = ["optimizer=sam", "optimizer.base=adam", "optimizer.lr=0.01", f"optimizer.adaptive={str(adaptive).lower()}"]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, base + SWS, points)
    assert incompatibility(compose_cfg(base + SWS)) is None
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
        _same_mixture(tmp_path, p)
