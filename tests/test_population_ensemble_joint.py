"""What acts on an ensemble as one model, in a population (regexp/population/ensemble.py's
``Owners.fgsm`` and ``Owners.joint``, regexp/population/mixture.py's shared mixture): FGSM,
tangent propagation, the gradient-norm penalty and soft weight sharing.

The former per-model loop handed these the Ensemble module itself, so (and so here):

- ``adversarial``: x' = x + ε·sign(∇ₓ CE(ln((1/K) Σₖ softmax(zₖ(x))), y)), the input gradient of the
  cross-entropy of the ensemble's prediction, one x' that all K models then train on;
- ``tangent_prop``: λ·(1/B)·Σᵢ ‖J_x f(xᵢ)·v(xᵢ)‖² with f the ensemble's output ln((1/K) Σₖ softmax(zₖ));
- ``gradient_norm_penalty``: ``full``: λ‖∇_θ Σₖ CEₖ‖² over all K models' parameters (= Σₖ ‖∇_θₖ CEₖ‖²);
  ``sgd``: λ·(1/k)·Σⱼ ‖∇_θ CE(f(x_j), y_j)‖², each micro-batch's loss that of the ensemble's prediction;
- ``soft_weight_sharing``: one learned mixture over all K models' weights (started from their
  joint range), λ·(Ω(all weights) + the Gamma hyperprior on its σ once), in its own optimizer group;
  under SAM (ASAM) the ascent ε̂ = ρ·T²g/‖Tg‖ over all K models' weights and that one mixture.

The reference is tests/test_population_ensemble.py's plain-torch ensemble with these written into
its step: the FGSM input gradient by autograd, J·v by forward-mode AD (``torch.func.jvp``, not the
population's double backward), the tangent v by regexp.regularizers.tangent_prop.tangents (the
data transformation, checked in tests/test_tangent_prop.py), the mixture prior written out.
Tolerances as that file states them (float32, only the summation order inside the batched
products differs): every parameter (and the mixture's μ, σ) within |a - b| <= 1e-5 + 1e-4·|b| of
the reference after 30 steps, the test loss a relative 1e-4; a member of a population of three
against its population of one alike, every metric a relative 1e-4.
"""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_population_ensemble import (ATOL, BASE, RTOL, RUN, _assert_same_member, _components,
                                      _ensemble_log_prob, _members, assert_each_equals_alone, reference_run)
from regexp.data import load_data
from regexp.population import train_population
from regexp.regularizers.tangent_prop import tangents
from regexp.sweep import point_name
from regexp.train.trainer import train

K = 3


def _fgsm(eps: float, mix: float):
    def transform(nets: List[nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = round(mix * len(x))
        xa = x[:k].detach().requires_grad_(True)
        loss = F.cross_entropy(_ensemble_log_prob(nets, xa), y[:k], reduction="sum")
        (g,) = torch.autograd.grad(loss, xa)
        return torch.cat([(xa + eps * g.sign()).detach(), x[k:]])
    return transform


def _tangent_prop(lam: float, shape):
    def penalty(nets, x, y, loss):
        (v,) = tangents(x.view(-1, *shape), ["shift"], 0.05)
        _, jv = torch.func.jvp(lambda xi: _ensemble_log_prob(nets, xi), (x,), (v.reshape(x.shape),))
        return lam * jv.pow(2).sum() / len(x)
    return penalty


def _grad_norm(lam: float, mode: str, micro: int = 4):
    def sq(loss, nets):
        params = [p for n in nets for p in n.parameters()]
        return sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params, create_graph=True))

    def penalty(nets, x, y, loss):
        if mode == "full":
            return lam * sq(loss, nets)
        parts = zip(torch.tensor_split(x, micro), torch.tensor_split(y, micro))
        return lam * sum(sq(F.cross_entropy(_ensemble_log_prob(nets, xj), yj), nets) for xj, yj in parts) / micro
    return penalty


class _Prior:
    """One Gaussian mixture over all K models' weights, its own Adam group (``groups``), and
    λ·(−Σ_w ln Σⱼ πⱼ N(w | μⱼ, σⱼ²) + Σⱼ ((α − 1)ξⱼ + β e^(−ξⱼ))), ξ = ln σ², π = softmax(η)."""

    def __init__(self, components: int, tau: float, lr: float, alpha: float, beta: float):
        self.c, self.lam, self.lr, self.alpha, self.beta = components, tau / 320, lr, alpha, beta

    @staticmethod
    def weights(nets) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for n in nets for p in n.parameters() if p.dim() >= 2])

    def groups(self, nets):
        w = self.weights(nets).detach()
        lo, hi = w.min().item(), w.max().item()
        self.mu = torch.linspace(lo, hi, self.c).requires_grad_()
        self.xi = torch.full((self.c,), 2 * math.log(max(hi - lo, 1e-3) / self.c)).requires_grad_()
        self.eta = torch.zeros(self.c).requires_grad_()
        return [{"params": [self.mu, self.xi, self.eta], "lr": self.lr}]

    def penalty(self, nets, x, y, loss):
        w = self.weights(nets)[:, None]
        joint = F.log_softmax(self.eta, 0) - 0.5 * (math.log(2 * math.pi) + self.xi
                                                   + (w - self.mu) ** 2 * torch.exp(-self.xi))
        hyper = ((self.alpha - 1) * self.xi + self.beta * torch.exp(-self.xi)).sum()
        return self.lam * (-torch.logsumexp(joint, 1).sum() + hyper)


SWS = ["regularizer=[ensemble,soft_weight_sharing]", "regularizer.soft_weight_sharing.components=4",
       "regularizer.soft_weight_sharing.gamma_alpha=2.0", "regularizer.soft_weight_sharing.gamma_beta=0.1"]
CASES = {
    "adversarial": (["regularizer=[ensemble,adversarial]", "regularizer.adversarial.eps=0.2"],
                    lambda shape: dict(transform=_fgsm(0.2, 0.5))),
    "tangent-prop": (["regularizer=[ensemble,tangent_prop]", "regularizer.tangent_prop.lam=0.1"],
                     lambda shape: dict(penalty=_tangent_prop(0.1, shape))),
    "grad-norm-full": (["regularizer=[ensemble,gradient_norm_penalty]", "regularizer.gradient_norm_penalty.lam=0.1"],
                       lambda shape: dict(penalty=_grad_norm(0.1, "full"))),
    "grad-norm-sgd": (["regularizer=[ensemble,gradient_norm_penalty]", "regularizer.gradient_norm_penalty.lam=0.1",
                       "regularizer.gradient_norm_penalty.mode=sgd"],
                      lambda shape: dict(penalty=_grad_norm(0.1, "sgd"))),
    "soft-weight-sharing": (SWS + ["regularizer.soft_weight_sharing.tau=2.0",
                                   "regularizer.soft_weight_sharing.lr=0.01"],
                            lambda shape: _prior_hooks(_Prior(4, 2.0, 0.01, 2.0, 0.1))),
    # SAM's ascent: one norm over all K models' weights and the one mixture (counted once)
    "soft-weight-sharing-sam": (SWS + ["regularizer.soft_weight_sharing.tau=2.0", "regularizer.soft_weight_sharing.lr=0.01",
                                       "optimizer=sam", "optimizer.base=adam", "optimizer.rho=0.1"],
                                lambda shape: _prior_hooks(_Prior(4, 2.0, 0.01, 2.0, 0.1))),
    "soft-weight-sharing-asam": (SWS + ["regularizer.soft_weight_sharing.tau=2.0", "regularizer.soft_weight_sharing.lr=0.01",
                                        "optimizer=sam", "optimizer.base=adam", "optimizer.rho=0.5",
                                        "optimizer.adaptive=true"],
                                 lambda shape: _prior_hooks(_Prior(4, 2.0, 0.01, 2.0, 0.1))),
}


def _prior_hooks(prior: _Prior):
    return dict(groups=prior.groups, penalty=prior.penalty, prior=prior)


@pytest.mark.parametrize("case", list(CASES))
def test_an_ensemble_trained_alone_equals_plain_torch(compose_cfg, tmp_path, case):
    overrides, hooks = CASES[case]
    cfg = compose_cfg(BASE + ["trainer.epochs=3", "regularizer.ensemble.components=3", "optimizer=adam",
                              "seed=4"] + overrides + ["optimizer.lr=0.003"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["engine"] == "population"
    shape = load_data(cfg.data, cfg.seed).input_shape
    hooks = hooks(shape)
    prior = hooks.pop("prior", None)
    init, nets, test_loss, test_acc = reference_run(cfg, **hooks)
    _, plain, plain_loss, _ = reference_run(cfg)  # the same ensemble without the term
    final = _components(torch.load(tmp_path / "run" / "model.pt", weights_only=True), K)
    for k, (a, net, other) in enumerate(zip(final, nets, plain)):
        for s, p in zip(a, net.parameters()):
            torch.testing.assert_close(s, p.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"model {k}: {m}")
    # the term reached the weights: without it every model ends elsewhere
    assert all(not torch.allclose(a[0], next(o.parameters()), atol=1e-4) for a, o in zip(final, plain))
    assert metrics["final"]["test_loss"] == pytest.approx(test_loss, rel=RTOL)
    assert metrics["final"]["test_acc"] == pytest.approx(test_acc, abs=1e-6)
    if prior is not None:  # the one mixture, as the report reads it
        mu, sigma = (torch.tensor([metrics["extra"][f"soft_weight_sharing/{n}_{j}"] for j in range(4)])
                     for n in ("mu", "sigma"))
        torch.testing.assert_close(mu, prior.mu.detach(), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(sigma, (0.5 * prior.xi.detach()).exp(), atol=ATOL, rtol=RTOL)


MEMBERS = {
    # FGSM's dropout draws from each member's generator; ε, p, width and seed differ
    "adversarial": (["regularizer=[ensemble,adversarial,dropout]"],
                    [{"seed": 0, "regularizer.adversarial.eps": 0.1, "regularizer.dropout.p": 0.1},
                     {"seed": 1, "regularizer.adversarial.eps": 0.3, "regularizer.dropout.p": 0.2, "model.width": 16},
                     {"seed": 2, "regularizer.adversarial.eps": 0.0, "regularizer.dropout.p": 0.0}]),
    # the extra pass draws fresh dropout masks; bagging's weights and clipping per owner
    "tangent-prop": (["regularizer=[ensemble,tangent_prop,dropout]", "regularizer.ensemble.bootstrap=true",
                      "trainer.grad_clip=1.0"],
                     [{"seed": 0, "regularizer.tangent_prop.lam": 0.01, "regularizer.dropout.p": 0.1},
                      {"seed": 1, "regularizer.tangent_prop.lam": 0.1, "model.width": 16},
                      {"seed": 2, "regularizer.tangent_prop.lam": 1.0, "optimizer.lr": 0.001}]),
    "grad-norm-full": (["regularizer=[ensemble,gradient_norm_penalty,label_smoothing]",
                        "regularizer.ensemble.bootstrap=true"],
                       [{"seed": 0, "regularizer.gradient_norm_penalty.lam": 0.01},
                        {"seed": 1, "regularizer.gradient_norm_penalty.lam": 0.1,
                         "regularizer.label_smoothing.eps": 0.2},
                        {"seed": 2, "regularizer.gradient_norm_penalty.lam": 1.0, "model.width": 16}]),
    "grad-norm-sgd": (["regularizer=[ensemble,gradient_norm_penalty,label_smoothing,input_noise]",
                       "regularizer.gradient_norm_penalty.mode=sgd"],
                      [{"seed": 0, "regularizer.gradient_norm_penalty.lam": 0.01},
                       {"seed": 1, "regularizer.gradient_norm_penalty.lam": 0.1,
                        "regularizer.label_smoothing.eps": 0.2, "regularizer.input_noise.sigma": 0.3},
                       {"seed": 2, "regularizer.gradient_norm_penalty.lam": 1.0, "model.width": 16}]),
    # each owner's one mixture (its copies on its slices stay equal), with its own τ, lr and start
    "soft-weight-sharing": (SWS + ["regularizer.ensemble.bootstrap=true"],
                            [{"seed": 0, "regularizer.soft_weight_sharing.tau": 0.5},
                             {"seed": 1, "regularizer.soft_weight_sharing.tau": 2.0,
                              "regularizer.soft_weight_sharing.lr": 0.01, "model.width": 16},
                             {"seed": 2, "regularizer.soft_weight_sharing.tau": 1.0,
                              "regularizer.soft_weight_sharing.init_sigma": 0.05}]),
    # SAM's ascent per owner: its own ρ, its mixture counted once in its norm
    "soft-weight-sharing-sam": (SWS + ["optimizer=sam", "optimizer.base=adam", "optimizer.adaptive=true"],
                                [{"seed": 0, "optimizer.rho": 0.1, "regularizer.soft_weight_sharing.tau": 0.5},
                                 {"seed": 1, "optimizer.rho": 0.5, "regularizer.soft_weight_sharing.tau": 2.0,
                                  "model.width": 16},
                                 {"seed": 2, "optimizer.rho": 0.05, "regularizer.soft_weight_sharing.lr": 0.01}]),
}


@pytest.mark.parametrize("case", list(MEMBERS))
def test_ensemble_members_of_a_population_of_three_equal_each_alone(compose_cfg, tmp_path, monkeypatch, case):
    variant, points = MEMBERS[case]
    base = compose_cfg(BASE + ["trainer.epochs=2", "regularizer.ensemble.components=2", "optimizer=adam"]
                       + variant + ["optimizer.lr=0.003"])
    assert_each_equals_alone(base, points, tmp_path, monkeypatch)


def test_cnn_ensembles_with_all_four_equal_each_alone(compose_cfg, tmp_path, monkeypatch):
    # the same owner-wise FGSM, J_x f and mixture through the stacked CNN's forward
    base = compose_cfg(RUN + ["model=cnn_mnist1d", "trainer.epochs=1", "optimizer=adam",
                              "regularizer.ensemble.components=2",
                              "regularizer=[ensemble,adversarial,tangent_prop,soft_weight_sharing]"])
    points = [{"seed": 0, "regularizer.adversarial.eps": 0.1},
              {"seed": 1, "regularizer.tangent_prop.lam": 0.1, "regularizer.soft_weight_sharing.tau": 0.5},
              {"seed": 2, "optimizer.lr": 0.003, "regularizer.adversarial.eps": 0.3}]
    sizes = _members(monkeypatch)
    pop = train_population(base, points, tmp_path / "pop")
    assert sizes == [3]
    for p, a in zip(points, pop):
        (b,) = train_population(base, [p], tmp_path / "one")
        _assert_same_member(tmp_path / "pop" / point_name(p), tmp_path / "one" / point_name(p), a, b)
