"""Curvature estimates against exact Hessians: a tiny MLP's (torch.autograd.functional.hessian)
and quadratics ½wᵀAw with a chosen spectrum."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.probes.hessian import (density_grid, flat, hutchinson_trace, hvp_operator, lanczos,
                                   rademacher, slq, top_eigenvalues)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_mlp_problem():
    """A 3-4-3 tanh MLP (31 parameters) with its cross-entropy on 8 points, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def loss_of(w):
        chunks, i = [], 0
        for s in shapes:
            n = math.prod(s)
            chunks.append(w[i:i + n].reshape(s))
            i += n
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], chunks)), (x,))
        return F.cross_entropy(out, y)

    w0 = flat([p.detach() for p in params])
    H = torch.autograd.functional.hessian(loss_of, w0)
    matvec = hvp_operator(F.cross_entropy(model(x), y), params)
    return H, matvec, len(w0)


def quadratic(eigs, seed=0):
    """½ wᵀAw with A = Q diag(eigs) Qᵀ (a random rotation): H = A everywhere."""
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ Q.T
    w = torch.randn(n, dtype=torch.float64, generator=gen(seed + 1), requires_grad=True)
    return A, hvp_operator(0.5 * w @ A @ w, [w])


def test_hvp_equals_exact_hessian_times_vector():
    H, matvec, n = tiny_mlp_problem()
    v = torch.randn(n, dtype=torch.float64, generator=gen(3))
    torch.testing.assert_close(matvec(v), H @ v, rtol=1e-10, atol=1e-12)


def test_top_eigenvalues_of_tiny_mlp_match_exact_hessian():
    H, matvec, n = tiny_mlp_problem()
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    # a Krylov space of 20 of the 31 dimensions already pins the top three
    T = lanczos(matvec, rademacher(n, gen(), torch.device("cpu")), steps=20)
    est = torch.tensor(top_eigenvalues(T, k=3), dtype=torch.float64)
    torch.testing.assert_close(est, exact, rtol=1e-4, atol=0)


def test_lanczos_with_full_dimension_gives_whole_spectrum_of_quadratic():
    eigs = [10.0, 5.0, 2.0, 1.0, 0.5, 0.1, -0.3, -2.0]
    _, matvec = quadratic(eigs)
    theta, _ = lanczos(matvec, rademacher(8, gen(), torch.device("cpu")), steps=8).eig()
    torch.testing.assert_close(theta, torch.tensor(sorted(eigs), dtype=torch.float64), rtol=0, atol=1e-10)


def test_top_eigenvalues_of_quadratic_with_separated_top():
    eigs = [50.0, 20.0] + torch.linspace(0.0, 1.0, 198).tolist()
    _, matvec = quadratic(eigs)
    est = top_eigenvalues(lanczos(matvec, rademacher(200, gen(), torch.device("cpu")), steps=30), k=2)
    assert est == pytest.approx([50.0, 20.0], rel=1e-8)


def test_lanczos_stops_on_invariant_space():
    # three distinct eigenvalues: the Krylov space has dimension 3 whatever the start
    _, matvec = quadratic([4.0] * 5 + [1.0] * 5 + [-1.0] * 5)
    T = lanczos(matvec, rademacher(15, gen(), torch.device("cpu")), steps=15)
    assert len(T.alpha) == 3
    torch.testing.assert_close(T.eig()[0], torch.tensor([-1.0, 1.0, 4.0], dtype=torch.float64))


def test_hutchinson_is_exact_for_diagonal_hessian():
    d = torch.linspace(-1, 7, 50, dtype=torch.float64)
    trace, err = hutchinson_trace(lambda v: d * v, 50, samples=3, generator=gen())
    assert trace == pytest.approx(float(d.sum()), abs=1e-12) and err == pytest.approx(0, abs=1e-12)


def test_hutchinson_trace_of_tiny_mlp_within_its_error_bound():
    H, matvec, n = tiny_mlp_problem()
    trace, err = hutchinson_trace(matvec, n, samples=2000, generator=gen())
    # variance of one sample: 2 Σ_{i≠j} H_ij²; the estimate must lie within 4 standard errors
    sd = math.sqrt(2 * float((H ** 2).sum() - (H.diag() ** 2).sum()) / 2000)
    assert err == pytest.approx(sd, rel=0.15)
    assert abs(trace - float(H.trace())) < 4 * sd


def deflated_trace(matvec, n, steps, samples, seed):
    """Hutch++ as the probe runs it: the first SLQ run's Krylov basis and diagonal, then samples."""
    basis = []
    q = slq(matvec, n, runs=1, steps=steps, generator=gen(seed), basis=basis)
    return hutchinson_trace(matvec, n, samples, gen(seed + 1), basis=basis[0][0],
                            basis_trace=[float(q.runs[0].alpha.sum())])


def test_deflated_trace_is_exact_when_the_basis_spans_the_space():
    A, matvec = quadratic(torch.linspace(-2.0, 30.0, 24).tolist(), seed=5)
    trace, err = deflated_trace(matvec, 24, steps=24, samples=3, seed=0)
    # tr(QᵀAQ) with Q square orthogonal is tr A; the residual's samples are 0
    assert trace == pytest.approx(float(A.trace()), rel=1e-9) and err == pytest.approx(0, abs=1e-8)


def test_deflated_trace_is_unbiased_and_beats_plain_hutchinson_on_outliers():
    # a trained network's spectrum in miniature: a bulk near 0 and a few large outliers
    eigs = [50.0, 20.0, 8.0] + torch.linspace(-0.5, 1.0, 57).tolist()
    A, matvec = quadratic(eigs, seed=6)
    exact = float(A.trace())
    plain = [hutchinson_trace(matvec, 60, 3, gen(100 + s))[0] for s in range(200)]
    deflated = [deflated_trace(matvec, 60, steps=6, samples=3, seed=300 + 2 * s)[0] for s in range(200)]
    rms = lambda xs: math.sqrt(sum((x - exact) ** 2 for x in xs) / len(xs))  # noqa: E731
    mean_err = abs(sum(deflated) / len(deflated) - exact)
    sd = math.sqrt(sum((x - sum(deflated) / len(deflated)) ** 2 for x in deflated) / (len(deflated) - 1))
    assert mean_err < 4 * sd / math.sqrt(len(deflated))  # unbiased: within 4 standard errors
    assert rms(deflated) < rms(plain) / 5  # the outliers' variance is gone


def test_slq_density_of_known_spectrum():
    # half the eigenvalues at 1, a quarter at 4, a quarter at 10 (diagonal, so a Rademacher
    # start puts weight exactly 1/2, 1/4, 1/4 on them)
    d = torch.tensor([1.0] * 40 + [4.0] * 20 + [10.0] * 20, dtype=torch.float64)
    q = slq(lambda v: d * v, 80, runs=4, steps=10, generator=gen())
    assert q.moment(1) == pytest.approx(float(d.mean()), rel=1e-10)
    assert q.moment(2) == pytest.approx(float((d ** 2).mean()), rel=1e-10)
    sigma = 0.1
    grid = density_grid(q, sigma, points=4001)
    rho = q.density(grid, sigma)
    dx = float(grid[1] - grid[0])
    assert float(rho.sum() * dx) == pytest.approx(1.0, abs=1e-6)
    assert float((grid * rho).sum() * dx) == pytest.approx(float(d.mean()), rel=1e-6)
    # Gaussian smoothing adds σ² to the second moment
    assert float((grid ** 2 * rho).sum() * dx) == pytest.approx(float((d ** 2).mean()) + sigma ** 2, rel=1e-6)
    near = lambda c: float(rho[(grid - c).abs() < 1.0].sum() * dx)  # noqa: E731
    assert (near(1.0), near(4.0), near(10.0)) == pytest.approx((0.5, 0.25, 0.25), abs=1e-6)


def test_slq_first_moment_of_rotated_spectrum_is_mean_eigenvalue():
    eigs = torch.linspace(-1.0, 5.0, 60).tolist()
    _, matvec = quadratic(eigs, seed=4)
    q = slq(matvec, 60, runs=200, steps=15, generator=gen())
    # each run's first moment is vᵀAv/‖v‖², unbiased for tr A / n = 2; with 200 runs its
    # standard error is about 0.02
    assert q.moment(1) == pytest.approx(2.0, abs=0.1)
    assert torch.allclose(q.weights.sum(1), torch.ones(200, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_hvp_of_every_model_equals_finite_difference_of_gradients(name, compose_cfg):
    from regexp.models import build_model
    from regexp.probes.base import ProbeInputs
    from regexp.probes.hessian import loss_hvp

    over = {"transformer": ["model.embed_dim=8", "model.heads=2", "model.depth=1"],
            "cnn": ["model.channels=[4,4]"], "mlp": ["model.width=8"]}[name]
    torch.manual_seed(0)
    model = build_model(compose_cfg([f"model={name}", *over]).model, (1, 40), 10).double().eval()
    x, y = torch.randn(6, 1, 40, dtype=torch.float64), torch.randint(0, 10, (6,))
    params = list(model.parameters())
    inputs = ProbeInputs(model, params, x, y, x, y, 6)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=gen(1))
    hv = loss_hvp(inputs)(v)

    def grad_at(shift):
        with torch.no_grad():
            i = 0
            for p in params:
                p.add_(shift[i:i + p.numel()].view_as(p))
                i += p.numel()
        g = flat(torch.autograd.grad(inputs.loss(), params))
        with torch.no_grad():
            i = 0
            for p in params:
                p.sub_(shift[i:i + p.numel()].view_as(p))
                i += p.numel()
        return g

    h = 1e-5
    fd = (grad_at(h * v) - grad_at(-h * v)) / (2 * h)
    torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-7)


def test_lanczos_reorthogonalization_keeps_converged_eigenvalues_single():
    # two outliers converge within a few steps; without reorthogonalization the basis loses
    # orthogonality once they have, and copies ("ghosts") of 100 and 99 fill the top Ritz values
    eigs = [100.0, 99.0] + torch.linspace(0.0, 1.0, 298).tolist()
    _, matvec = quadratic(eigs)
    T = lanczos(matvec, rademacher(300, gen(), torch.device("cpu")), steps=80)
    top = top_eigenvalues(T, 3)
    assert top[:2] == pytest.approx([100.0, 99.0], rel=1e-12) and top[2] <= 1.0 + 1e-9


class _NoBoard:
    def png(self, tag, data, height, width, step):
        pass


def test_density_plot_redrawn_equals_a_fresh_one(tmp_path):
    # the process's density figure is reused: nothing of an earlier density (limits, ticks,
    # title) may show in the next
    from regexp.probes.hessian import DensityPlot
    from regexp.probes.runner import save_figure

    def density(lo, hi):
        d = torch.linspace(lo, hi, 60, dtype=torch.float64)
        return slq(lambda v: d * v, 60, runs=1, steps=12, generator=gen())

    def png(fig, name):
        return save_figure(fig, tmp_path / name, _NoBoard(), "t", 0).read_bytes()

    shared = DensityPlot()
    first = png(shared.draw(density(-3.0, 40.0), 0.4, "epoch 1"), "wide.png")
    again = png(shared.draw(density(0.1, 2.0), 0.02, "epoch 2"), "narrow.png")
    fresh = png(DensityPlot().draw(density(0.1, 2.0), 0.02, "epoch 2"), "fresh.png")
    assert again == fresh != first


def test_density_tick_labels_are_rounded_to_the_spacing():
    from regexp.probes.hessian import tick_label

    assert [tick_label(v, 2.5) for v in (0.0, 2.5, 5.0, 7.5)] == ["0", "2.5", "5", "7.5"]
    # the locator's sums: 3 × 0.1 and a zero that comes out as ±1e-16
    assert [tick_label(v, 0.1) for v in (0.30000000000000004, -1e-16, -0.1)] == ["0.3", "0", "-0.1"]
    assert tick_label(0.00025, 5e-5) == "0.00025" and tick_label(40.0, 10.0) == "40"
