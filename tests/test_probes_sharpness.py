"""Sharpness, norm, margin and gradient-noise measures against hand-written cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regexp.probes.sharpness import (average_sharpness, gradient_noise, margin_summary, margins,
                                     microbatch_grads, param_norms, rho_sharpness)


def quad(a, w):
    return lambda: 0.5 * a * (w ** 2).sum()


def test_rho_sharpness_of_isotropic_quadratic():
    # ½a‖w‖², g = aw: L(w + ρg/‖g‖) − L(w) = ρ‖g‖ + ρ²a/2 exactly
    a, rho = 3.0, 0.1
    w = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()
    (s,) = rho_sharpness(quad(a, w), [w], rho)  # one member: a lone model
    assert s == pytest.approx(rho * a * float(before.norm()) + rho ** 2 * a / 2, rel=1e-12)
    assert torch.equal(w.detach(), before)  # restored bit for bit


def test_adaptive_rho_sharpness_of_quadratic():
    # ASAM: ε = ρ T²g/‖Tg‖ with T = |w| + η, g = aw, so the loss rises by a wᵀε + ½a‖ε‖²
    a, rho, eta = 2.0, 0.5, 0.01
    w = torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64, requires_grad=True)
    wd = w.detach().clone()
    g, T = a * wd, wd.abs() + eta
    eps = rho * T ** 2 * g / (T * g).norm()
    expected = a * float(wd @ eps) + 0.5 * a * float(eps @ eps)
    assert rho_sharpness(quad(a, w), [w], rho, adaptive=True, eta=eta) == pytest.approx([expected], rel=1e-12)


def test_average_sharpness_replays_the_generator_draws():
    a, sigma = 1.5, 0.2
    w = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64, requires_grad=True)
    loss = lambda: 0.5 * a * ((w ** 2).sum() + (v ** 2).sum())  # noqa: E731
    (s,) = average_sharpness(loss, [w, v], sigma, samples=3, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    by_hand = []
    for _ in range(3):
        zw, zv = sigma * torch.randn(2, generator=g, dtype=torch.float64), \
            sigma * torch.randn(2, 2, generator=g, dtype=torch.float64)
        # ½a‖w ± z‖² − ½a‖w‖² = ±a wᵀz + ½a‖z‖²: the antithetic pair's mean is ½a‖z‖²
        for sign in (1, -1):
            by_hand.append(sign * a * float(w.detach() @ zw + (v.detach() * zv).sum())
                           + 0.5 * a * float(zw @ zw + (zv ** 2).sum()))
    assert s == pytest.approx(sum(by_hand) / 6, rel=1e-12)
    # a quadratic's pair mean is exactly ½a σ²‖z‖²: the first-order term is gone
    g = torch.Generator().manual_seed(7)
    zz = sum(float((sigma * torch.randn(n, generator=g, dtype=torch.float64)).pow(2).sum()) for _ in range(3) for n in (2, 4))
    assert s == pytest.approx(0.5 * a * zz / 3, rel=1e-12)
    assert torch.equal(w.detach(), torch.tensor([1.0, -0.5], dtype=torch.float64))


def test_param_norms():
    lin1, lin2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        lin1.bias.copy_(torch.tensor([1.0, 2.0]))
        lin2.weight.copy_(torch.tensor([[2.0, 0.0]]))
        lin2.bias.copy_(torch.tensor([0.0]))
    n = {k: v[0] for k, v in param_norms(list(torch.nn.Sequential(lin1, lin2).parameters())).items()}
    assert n["l2"] == pytest.approx(math.sqrt(9 + 16 + 1 + 4 + 4))
    assert n["l2_weights"] == pytest.approx(math.sqrt(9 + 16 + 4))
    assert n["frobenius_product"] == pytest.approx(5.0 * 2.0)


def test_margins_and_their_summary():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0], [0.2, 0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 2])
    m = margins(lambda x: x, logits, y, batch=3)  # two batches
    torch.testing.assert_close(m, torch.tensor([1.0, -3.0, 0.0, 0.7]))
    s = margin_summary(m)
    assert s["nonpositive"] == 0.5 and s["q50"] == pytest.approx(0.35)
    assert s["q05"] == pytest.approx(float(torch.quantile(m, 0.05)))


def per_example_grads_by_hand(W, x, y):
    """Softmax regression logits Wx: ∇_W CE = (softmax(Wx) − e_y) xᵀ, one per example."""
    p = torch.softmax(x @ W.T, 1)
    p[torch.arange(len(y)), y] -= 1
    return torch.einsum("nk,nd->nkd", p, x).reshape(len(y), -1)


def test_gradient_noise_of_softmax_regression_per_example():
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    loss_of = lambda xb, yb: F.cross_entropy(xb @ W.T, yb)  # noqa: E731
    grads = microbatch_grads(loss_of, [W], x, y, parts=12)[:, 0]  # (parts, members, P)
    G = per_example_grads_by_hand(W.detach(), x, y)
    torch.testing.assert_close(grads, G)
    noise = {k: v[0] for k, v in gradient_noise(grads[:, None], microbatch=1).items()}
    mean = G.mean(0)
    assert noise["trace"] == pytest.approx(float(((G - mean) ** 2).sum()) / 11, rel=1e-12)
    assert noise["grad_norm_sq"] == pytest.approx(float(mean @ mean), rel=1e-12)
    assert noise["simple_scale"] == pytest.approx(noise["trace"] / noise["grad_norm_sq"])


def test_gradient_noise_from_microbatches_scales_by_their_size():
    torch.manual_seed(1)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(13, 4, dtype=torch.float64), torch.randint(0, 3, (13,))
    grads = microbatch_grads(lambda xb, yb: F.cross_entropy(xb @ W.T, yb), [W], x, y, parts=4)[:, 0]
    G = per_example_grads_by_hand(W.detach(), x[:12], y[:12]).reshape(4, 3, -1).mean(1)  # 13th left out
    torch.testing.assert_close(grads, G)
    assert gradient_noise(grads[:, None], microbatch=3)["trace"] == pytest.approx(
        [3 * float(((G - G.mean(0)) ** 2).sum()) / 3], rel=1e-12)
