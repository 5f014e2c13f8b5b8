"""The regularizer catalogue: each test checks the mathematics a regularizer promises."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import lone_batch, read_scalars
from regexp.errors import ConfigError
from regexp.regularizers import REGULARIZERS
from regexp.regularizers.base import Context

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def make(name: str, ctx: Context = None, **kw):
    cls = REGULARIZERS[name]
    cfg = OmegaConf.structured(cls.Config(**kw))
    return cls(cfg, ctx or Context(num_classes=3, n_train=20, device=torch.device("cpu")))


class Tiny(nn.Module):
    """Two layers with biases, named like the project's models (``head`` is the output layer)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def compose(*overrides):
    from hydra import compose as hcompose, initialize_config_dir
    from regexp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


# ---------------------------------------------------------------- norm penalties
def _stacked_members(widths=(6, 4)):
    """Two MLP members of different widths and the population's stacked network of them."""
    from regexp.models.mlp import MLP
    from regexp.population.stacked_mlp import StackedMLP

    torch.manual_seed(0)
    models = [MLP(4, 3, w, 2, "relu") for w in widths]
    return models, StackedMLP(models, list(widths), max(widths), "relu", torch.device("cpu"))


def _stacked_penalty(name, net, hp, biases):
    """The penalty as the engine's LossTerms forms it: ``penalty_of`` on the stacked tensors
    ``_penalized`` selects, each value (M,)."""
    from types import SimpleNamespace

    from regexp.population.engine import _penalized

    hp = SimpleNamespace(**{k: torch.tensor(v) for k, v in hp.items()})
    return REGULARIZERS[name].penalty_of([p for _, p in _penalized(net, biases)], hp, True)


def _member_grads(net, m):
    """Member m's gradient of every parameter under its lone model's names, unpadded."""
    return net.member_state(m, [torch.zeros_like(p) if p.grad is None else p.grad for p in net.params])


@pytest.mark.parametrize("name,kw", [("weight_decay", {"lam": [0.3, 0.05]}), ("l1", {"lam": [0.3, 0.05]}),
                                     ("elastic_net", {"lam1": [0.2, 0.0], "lam2": [0.7, 0.4]})])
def test_norm_penalty_values_and_gradients(name, kw):
    models, net = _stacked_members()
    pen = _stacked_penalty(name, net, kw, biases=False)
    pen.sum().backward()  # members are independent: the sum's gradient is each one's own
    for m, model in enumerate(models):
        ws = {k: p.detach().numpy().astype(np.float64) for k, p in model.named_parameters() if p.dim() >= 2}
        if name == "weight_decay":
            lam = kw["lam"][m]
            value, grads = lam / 2 * sum((w ** 2).sum() for w in ws.values()), {k: lam * w for k, w in ws.items()}
        elif name == "l1":
            lam = kw["lam"][m]
            value = lam * sum(np.abs(w).sum() for w in ws.values())
            grads = {k: lam * np.sign(w) for k, w in ws.items()}
        else:
            l1, l2 = kw["lam1"][m], kw["lam2"][m]
            value = sum(l1 * np.abs(w).sum() + l2 / 2 * (w ** 2).sum() for w in ws.values())
            grads = {k: l1 * np.sign(w) + l2 * w for k, w in ws.items()}
        assert pen[m].item() == pytest.approx(value, rel=1e-6)
        got = _member_grads(net, m)
        for k, g in grads.items():
            np.testing.assert_allclose(got[k].numpy(), g, rtol=1e-6, atol=1e-7)
        # biases are excluded by default: the penalty does not reach them
        assert all(torch.count_nonzero(got[k]) == 0 for k, p in model.named_parameters() if p.dim() < 2)


def test_norm_penalty_can_include_biases():
    models, net = _stacked_members()
    pen = _stacked_penalty("l1", net, {"lam": [1.0, 1.0]}, biases=True)
    for m, model in enumerate(models):
        expected = sum(p.abs().sum() for p in model.parameters())
        assert pen[m].item() == pytest.approx(expected.item(), rel=1e-6)


def _adam_np(w, grad_fn, lr, b1, b2, eps, steps, decoupled_lam=0.0):
    """Adam written from the textbook; decoupled decay as Loshchilov & Hutter's AdamW."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        g = grad_fn(w)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w = w - lr * (mh / (np.sqrt(vh) + eps) + decoupled_lam * w)
    return w


def _run_population_steps(name, w0, a, lam, lr, steps):
    """One member's step sequence in the population engine: loss + its LossTerms penalty,
    backward, Bucket.before_step's decoupled shrink, then the StackedOptimizer's Adam step."""
    from types import SimpleNamespace

    from regexp.population.optim import StackedOptimizer
    from regexp.regularizers.decoupled_weight_decay import DecoupledWeightDecay

    w = torch.tensor(w0, dtype=torch.float64).reshape(1, 1, -1).requires_grad_()  # member 0's 2-D weight
    opt = StackedOptimizer("adam", [w], {"lr": [lr], "beta1": [0.9], "beta2": [0.999], "eps": [1e-8],
                                         "weight_decay": [0.0]}, False, torch.device("cpu"))
    lam_m = torch.tensor([lam], dtype=torch.float64)
    at = torch.tensor(a, dtype=torch.float64)
    for _ in range(steps):
        loss = 0.5 * ((w[0, 0] - at) ** 2).sum()  # E(w) = ½‖w − a‖², ∇E = w − a
        if name == "weight_decay":
            loss = loss + REGULARIZERS[name].penalty_of([w], SimpleNamespace(lam=lam_m), True).sum()
        w.grad = None
        loss.backward()
        if name == "decoupled_weight_decay":  # as Bucket.before_step: η·factor and λ per member, float64
            lr_m = opt.hp["lr"]
            DecoupledWeightDecay.shrink_([w], lr_m.view(-1) if isinstance(lr_m, torch.Tensor) else lr_m, lam_m)
        opt.step(1.0)
    return w.detach()[0, 0].numpy()


def test_coupled_and_decoupled_decay_under_adam_follow_their_textbook_updates():
    rng = np.random.default_rng(0)
    w0, a = rng.normal(size=5), rng.normal(size=5)
    lam, lr, steps = 0.5, 0.1, 4
    coupled = _run_population_steps("weight_decay", w0, a, lam, lr, steps)
    decoupled = _run_population_steps("decoupled_weight_decay", w0, a, lam, lr, steps)
    # L2: the penalty's gradient λw goes through Adam's normalisation
    want_coupled = _adam_np(w0, lambda w: (w - a) + lam * w, lr, 0.9, 0.999, 1e-8, steps)
    # decoupled: Adam on ∇E only, then −ηλw from the weights before the step
    want_decoupled = _adam_np(w0, lambda w: w - a, lr, 0.9, 0.999, 1e-8, steps, decoupled_lam=lam)
    np.testing.assert_allclose(coupled, want_coupled, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(decoupled, want_decoupled, rtol=1e-10, atol=1e-12)
    assert np.abs(coupled - decoupled).max() > 1e-3  # under Adam the two really differ
    # and the decoupled one is exactly torch's AdamW
    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=lam)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((w - torch.tensor(a)) ** 2).sum()).backward()
        opt.step()
    np.testing.assert_allclose(decoupled, w.detach().numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- soft weight sharing
def _sws_closed_forms(w, mu, xi, eta, lam):
    """Bishop's eqs. 9.24–9.31 (shared/reference.md), written out in numpy."""
    s2 = np.exp(xi)
    pi = np.exp(eta) / np.exp(eta).sum()
    dens = pi * np.exp(-(w[:, None] - mu) ** 2 / (2 * s2)) / np.sqrt(2 * np.pi * s2)
    gamma = dens / dens.sum(1, keepdims=True)  # (9.24)
    omega = -np.log(dens.sum(1)).sum()  # (9.22)
    d_w = lam * (gamma * (w[:, None] - mu) / s2).sum(1)  # (9.25)
    d_mu = lam * (gamma * (mu - w[:, None]) / s2).sum(0)  # (9.26)
    d_xi = 0.5 * lam * (gamma * (1 - (w[:, None] - mu) ** 2 / s2)).sum(0)  # (9.28)
    d_eta = lam * (pi - gamma).sum(0)  # (9.31)
    return omega, d_w, d_mu, d_xi, d_eta


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_weight_sharing_gradients_equal_bishop(seed):
    from regexp.regularizers.soft_weight_sharing import Mixture

    rng = np.random.default_rng(seed)
    k, lam = int(rng.integers(2, 6)), float(rng.uniform(0.1, 2))
    w = rng.normal(0, 0.5, size=40)
    mu, xi, eta = rng.normal(0, 0.5, k), rng.normal(-2, 0.5, k), rng.normal(0, 1, k)
    mix = Mixture(torch.tensor(mu), 1.0).double()
    with torch.no_grad():
        mix.xi.copy_(torch.tensor(xi))
        mix.eta.copy_(torch.tensor(eta))
    wt = torch.tensor(w, requires_grad=True)
    (lam * mix.omega(wt)).backward()
    omega, d_w, d_mu, d_xi, d_eta = _sws_closed_forms(w, mu, xi, eta, lam)
    assert mix.omega(wt).item() == pytest.approx(omega, rel=1e-10)
    np.testing.assert_allclose(wt.grad.numpy(), d_w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mix.free_mu.grad.numpy(), d_mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mix.xi.grad.numpy(), d_xi, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mix.eta.grad.numpy(), d_eta, rtol=1e-9, atol=1e-12)


def _sws_penalty(reg):
    """λ·Ω as the population forms it (regexp/population/mixture.py: ``penalty_of`` on what
    ``hypers`` gives), for one model's covered weights and its own mixture."""
    m = reg.mixture
    return reg.penalty_of(reg.params, reg.hypers(reg.lam, m.free_mu, m.xi, m.eta), False)


def test_soft_weight_sharing_keeps_a_distribution_and_positive_variances():
    torch.manual_seed(0)
    model = Tiny()
    reg = make("soft_weight_sharing", components=4, tau=20.0, lr=0.5)  # λ = τ/N = 1
    reg.attach(model)
    groups = reg.param_groups()
    assert groups[0]["lr"] == 0.5 and len(groups[0]["params"]) == 3
    opt = torch.optim.SGD([{"params": list(model.parameters())}] + groups, lr=0.5)
    for _ in range(50):  # large steps: the unconstrained parameters move a lot
        opt.zero_grad()
        _sws_penalty(reg).backward()
        opt.step()
    pi = reg.mixture.log_pi().exp()
    assert torch.all(pi >= 0) and pi.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(torch.exp(reg.mixture.xi) > 0)
    vals = reg._mixture_values()
    assert sum(vals[f"pi_{j}"] for j in range(4)) == pytest.approx(1.0, abs=1e-6)


def test_soft_weight_sharing_initial_means_span_the_weights():
    torch.manual_seed(0)
    model = Tiny()
    reg = make("soft_weight_sharing", components=5)
    reg.attach(model)
    w = torch.cat([model.body.weight.flatten(), model.head.weight.flatten()])
    mu = reg.mixture.mu.detach()
    assert mu[0].item() == pytest.approx(w.min().item()) and mu[-1].item() == pytest.approx(w.max().item())
    assert torch.allclose(torch.exp(0.5 * reg.mixture.xi), torch.full((5,), (w.max() - w.min()).item() / 5))


def test_soft_weight_sharing_zero_component_with_fixed_pi0():
    torch.manual_seed(0)
    model = Tiny()
    reg = make("soft_weight_sharing", components=3, zero_component=True, pi0=0.9, tau=20.0)
    reg.attach(model)
    opt = torch.optim.SGD([{"params": list(model.parameters())}] + reg.param_groups(), lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        _sws_penalty(reg).backward()
        opt.step()
    assert reg.mixture.mu[0].item() == 0.0
    assert reg.mixture.log_pi().exp()[0].item() == pytest.approx(0.9, abs=1e-7)
    learned = make("soft_weight_sharing", components=3, zero_component=True, pi0=0.9, learn_pi0=True)
    learned.attach(model)  # learned π₀ starts at pi0 too
    assert learned.mixture.log_pi().exp()[0].item() == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("zero", [False, True])
def test_quantization_snaps_to_at_most_k_means(zero):
    torch.manual_seed(1)
    model = Tiny()
    reg = make("soft_weight_sharing", components=3, zero_component=zero, merge_distance=0.0)
    reg.attach(model)
    snapped = reg.snap(model)
    mu = reg.mixture.mu.detach()
    for orig, new in ((model.body.weight, snapped.body.weight), (model.head.weight, snapped.head.weight)):
        j = reg.mixture.responsibilities(orig.detach().flatten()).argmax(1)
        assert torch.equal(new.detach().flatten(), mu[j])
    w = torch.cat([snapped.body.weight.flatten(), snapped.head.weight.flatten()])
    assert torch.unique(w).numel() <= 3
    assert torch.equal(snapped.body.bias, model.body.bias)  # biases are not covered by default
    assert not torch.equal(model.body.weight, snapped.body.weight)  # the trained model is untouched
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    ev = lambda m, a, b: (F.cross_entropy(m(a), b), (m(a).argmax(1) == b).float().mean())  # noqa: E731
    reg.cfg.quantize = True
    out = reg.report(model, {"val": (x, y), "test": (x, y)}, ev)
    assert out["soft_weight_sharing/distinct_values"] == torch.unique(w).numel()
    assert out["soft_weight_sharing/zero_fraction"] == pytest.approx((w == 0).float().mean().item())
    assert out["soft_weight_sharing/quantized_test_acc"] == pytest.approx(ev(snapped, x, y)[1].item())


def test_soft_weight_sharing_layers_select_parameters():
    model = Tiny()
    reg = make("soft_weight_sharing", components=2, layers=["head"])
    reg.attach(model)
    assert reg.params == [model.head.weight]
    with pytest.raises(ConfigError, match="layers"):
        make("soft_weight_sharing", layers=["nothing"]).attach(model)


def test_soft_weight_sharing_penalty_is_tau_over_n_times_omega_plus_the_gamma_hyperprior():
    """λ = τ/N (Ullrich et al. 2017's τ, the data term being a mean over N examples); the Gamma
    hyperprior adds −Σⱼ ln Gamma(1/σⱼ² | α, β), here compared between two sets of variances."""
    torch.manual_seed(0)
    model = Tiny()
    ctx = Context(num_classes=3, n_train=50, device=torch.device("cpu"))
    reg = make("soft_weight_sharing", ctx, components=3, tau=0.2)
    reg.attach(model)
    assert _sws_penalty(reg).item() == pytest.approx(0.2 / 50 * reg.mixture.omega(reg._weights()).item())
    alpha, beta = 30.0, 0.5
    hyper = make("soft_weight_sharing", ctx, components=3, tau=0.2, gamma_alpha=alpha, gamma_beta=beta)
    hyper.attach(model)
    gamma = torch.distributions.Gamma(alpha, beta)

    def neg_log_posterior(xi):
        with torch.no_grad():
            hyper.mixture.xi.copy_(torch.tensor(xi))
        prior = hyper.mixture.omega(hyper._weights()) - gamma.log_prob(torch.exp(-torch.tensor(xi))).sum()
        return _sws_penalty(hyper).item(), 0.2 / 50 * prior.item()

    (p1, want1), (p2, want2) = neg_log_posterior([-4.0, -3.0, -5.0]), neg_log_posterior([-2.0, -6.0, -3.5])
    assert p1 - p2 == pytest.approx(want1 - want2, rel=1e-5)


def test_merge_joins_close_means_against_a_hand_computed_case():
    from regexp.regularizers.soft_weight_sharing import merge

    mu = torch.tensor([0.5, 0.1, -0.3, 0.1005], dtype=torch.float64)
    var = torch.tensor([0.01, 0.02, 0.03, 0.04], dtype=torch.float64)
    pi = torch.tensor([0.1, 0.2, 0.4, 0.3], dtype=torch.float64)
    m, v, p = merge(mu, var, pi, distance=0.01)
    # -0.3 alone, 0.1 and 0.1005 merged, 0.5 alone; sorted by mean
    joined = (0.2 * 0.1 + 0.3 * 0.1005) / 0.5  # 0.1003
    joined_var = (0.2 * (0.02 + (0.1 - joined) ** 2) + 0.3 * (0.04 + (0.1005 - joined) ** 2)) / 0.5
    np.testing.assert_allclose(m.numpy(), [-0.3, joined, 0.5], rtol=1e-12)
    np.testing.assert_allclose(v.numpy(), [0.03, joined_var, 0.01], rtol=1e-12)
    np.testing.assert_allclose(p.numpy(), [0.4, 0.5, 0.1], rtol=1e-12)
    # the zero component keeps its mean at 0 when a neighbour merges into it
    m, v, p = merge(torch.tensor([0.0, 0.0005, 0.3]), torch.full((3,), 0.01), torch.tensor([0.9, 0.05, 0.05]),
                    distance=0.001, zero=True)
    assert m.tolist() == [0.0, pytest.approx(0.3)] and p.tolist() == pytest.approx([0.95, 0.05])
    assert len(merge(mu, var, pi, distance=0.0)[0]) == 4


def test_quantize_takes_the_most_responsible_component_not_the_nearest_mean():
    from regexp.regularizers.soft_weight_sharing import quantize

    mu = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    var = torch.tensor([0.01, 1.0, 0.01], dtype=torch.float64)
    pi = torch.full((3,), 1 / 3, dtype=torch.float64)
    w = torch.tensor([[-0.9, -0.5], [0.2, 0.7], [0.95, 3.0]], dtype=torch.float64)
    # ln πⱼ𝒩(w|μⱼ,σⱼ²) up to ln π: −½ln(2πσⱼ²) − (w−μⱼ)²/2σⱼ². At w = 0.7: component 2 gives
    # 1.383 − 0.09/0.02 = −3.12, component 1 gives −0.919 − 0.49/2 = −1.16, so 0 although 1 is
    # nearer; at w = 3.0 the broad component 1 wins too.
    assert quantize(w, mu, var, pi).tolist() == [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]


def test_mixture_figure_data_is_a_density():
    torch.manual_seed(0)
    model = Tiny()
    reg = make("soft_weight_sharing", components=4, zero_component=True)
    reg.attach(model)
    d = reg.figure_data()
    assert torch.trapezoid(d["density"], d["x"]).item() == pytest.approx(1.0, abs=5e-3)
    widths = torch.diff(d["edges"])
    assert (d["hist"] * widths).sum().item() == pytest.approx(1.0, abs=1e-9)
    mu, var, pi = reg.merged()
    one = torch.tensor([0.1], dtype=torch.float64)
    by_hand = sum(p * torch.exp(-(one - m) ** 2 / (2 * v)) / torch.sqrt(2 * math.pi * v)
                  for m, v, p in zip(mu.double(), var.double(), pi.double()))
    from regexp.regularizers.soft_weight_sharing import density
    assert density(one, mu.double(), var.double(), pi.double()).item() == pytest.approx(by_hand.item(), rel=1e-10)


def test_storage_bits_of_a_hand_counted_sparse_layer():
    from regexp.regularizers.soft_weight_sharing import storage_bits

    # non-zeros at 0 and 6: gaps 1 and 6; with 2-bit gaps (at most 4) the second needs one stored
    # zero in between: 3 entries of (2 gap bits + 1 codebook bit for 2 values), the entry count,
    # 2 floats; a layer of zeros costs its entry count only
    t = torch.tensor([[1.0, 0, 0, 0], [0, 0, 2.0, 0]])
    assert storage_bits([t], index_bits=2) == 3 * (2 + 1) + 32 + 2 * 32
    assert storage_bits([t, torch.zeros(3, 3)], index_bits=2) == 3 * (2 + 1) + 2 * 32 + 2 * 32


# ---------------------------------------------------------------- dropout family
def test_dropout_keeps_the_expectation_and_is_the_identity_in_evaluation():
    from regexp.models.sites import Site

    torch.manual_seed(0)
    site = Site("hidden")
    site.p = 0.3
    h = torch.rand(1, 100) + 0.5
    out = site(h.expand(20000, -1))
    kept = out != 0
    assert torch.allclose(out[kept], (h.expand(20000, -1) / 0.7)[kept])  # kept units scaled 1/(1−p)
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    # E[out] = h: the sample mean's std is h·√(p/(1−p)/n) ≈ 0.005·h, so 4% is 8 standard errors
    assert torch.allclose(out.mean(0), h[0], rtol=0.04)
    site.eval()
    assert torch.equal(site(h), h)


def test_dropconnect_masks_weights_not_units():
    torch.manual_seed(0)
    model = nn.Module()
    model.body = nn.Linear(200, 50)
    model.head = nn.Linear(50, 2)
    reg = make("dropconnect", p=0.4)
    reg.attach(model)
    layer = model.body
    assert not hasattr(model.head, "weight_transforms")  # the output layer is left alone
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    x = torch.ones(2, 200)
    out = layer(x)
    mask = layer.last_mask
    assert mask.shape == layer.weight.shape
    assert torch.allclose(out, F.linear(x, layer.weight * mask / 0.6))
    assert torch.equal(out[0], out[1])  # one weight mask for the batch
    # unit dropout would give 0 or 200/0.6; DropConnect gives (kept connections)/0.6 per unit
    assert torch.allclose(out[0], mask.sum(1) / 0.6)
    assert ((out[0] > 0) & (out[0] < 200 / 0.6 - 1)).all()
    assert mask.mean().item() == pytest.approx(0.6, abs=0.02)
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_mc_dropout_with_one_sample_equals_one_stochastic_pass():
    from regexp.models import build_model
    from regexp.regularizers.mc_dropout import mc_predict

    cfg = compose().model
    torch.manual_seed(0)
    model = build_model(cfg, (1, 40), 10)
    make("dropout", p=0.5).attach(model)
    x = torch.randn(16, 1, 40)
    torch.manual_seed(123)
    mc = mc_predict(model, x, 1)
    torch.manual_seed(123)
    model.train()
    one = F.softmax(model(x), 1).detach()
    assert torch.allclose(mc, one, atol=1e-7)
    assert not model.eval()(x).allclose(model.train()(x))  # dropout really is on in that pass
    # and T passes average T different masks
    torch.manual_seed(5)
    mc3 = mc_predict(model, x, 3)
    torch.manual_seed(5)
    passes = [F.softmax(model.train()(x), 1).detach() for _ in range(3)]
    assert torch.allclose(mc3, sum(passes) / 3, atol=1e-6)


@pytest.mark.parametrize("eps", [[0.2, 0.05], [0.2, 0.2], [0.0, 0.0]])
def test_label_smoothing_equals_the_closed_form(eps):
    # the population's data loss (LossTerms.loss), each member with its own ε or one shared
    from types import SimpleNamespace

    from regexp.population.engine import LossTerms

    members = [SimpleNamespace(regs=[], cfg=OmegaConf.create({"regularizer": {"label_smoothing": {"eps": e}}}))
               for e in eps]
    terms = LossTerms(members, torch.device("cpu"), None)
    torch.manual_seed(0)
    logits, y = torch.randn(2, 7, 4), torch.randint(0, 4, (2, 7))
    loss = terms.loss(logits, y)
    for m, e in enumerate(eps):
        q = (1 - e) * F.one_hot(y[m], 4).double() + e / 4
        expected = -(q * F.log_softmax(logits[m].double(), 1)).sum(1).mean()
        assert loss[m].item() == pytest.approx(expected.item(), rel=1e-6)


def test_weight_noise_is_fresh_each_pass_and_never_stored():
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make("weight_noise", sigma=0.1).attach(model)
    x = torch.randn(5, 4)
    torch.manual_seed(7)
    out = model(x)
    (out ** 2).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the pass used W + σε with a fresh ε per layer, in the order the layers run
    torch.manual_seed(7)
    w1 = model.body.weight + 0.1 * torch.randn_like(model.body.weight)
    h = torch.relu(F.linear(x, w1, model.body.bias))
    w2 = model.head.weight + 0.1 * torch.randn_like(model.head.weight)
    expected = F.linear(h, w2, model.head.bias)
    assert torch.allclose(out, expected, atol=1e-6)
    # gradient of Σout² at the perturbed weights: 2·outᵀh for the head
    assert torch.allclose(model.head.weight.grad, 2 * expected.t() @ h, atol=1e-5)
    assert not torch.allclose(model(x), out)  # another draw
    model.eval()
    assert torch.equal(model(x), model.head(torch.relu(model.body(x))))


def test_input_noise_adds_zero_mean_noise_of_std_sigma():
    # the population's draw (StepNoise.noisy_input), each member with its own σ
    from regexp.population.dropout import MemberDropout
    from regexp.population.noise import StepNoise

    cpu = torch.device("cpu")
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    drop = MemberDropout([0.0, 0.0], [0.0, 0.0], gens, [4, 4], 100, 4, 1, cpu, True)
    x = torch.zeros(2, 200, 100)
    xn = StepNoise(drop, [0.5, 0.1], None, [False, False], cpu).noisy_input(x)
    for m, sigma in enumerate((0.5, 0.1)):
        assert xn[m].mean().item() == pytest.approx(0.0, abs=0.02 * sigma)
        assert xn[m].std().item() == pytest.approx(sigma, rel=0.01)


# ---------------------------------------------------------------- activity penalties
def _model_with_sites():
    from regexp.models import build_model

    torch.manual_seed(0)
    return build_model(compose().model, (1, 40), 10)


@pytest.mark.parametrize("name", ["activity_l1", "activity_student_t"])
def test_activity_penalties_match_their_formulas(name):
    from regexp.models.sites import sites

    model = _model_with_sites()
    kw = {"alpha": 0.3} if name == "activity_l1" else {"alpha": 0.3, "gamma": 2.0}
    reg = make(name, **kw)
    reg.attach(model)
    for s in sites(model, "hidden"):
        s.record = True
    x = torch.randn(8, 1, 40)
    model(x)
    hs = [s.last for s in sites(model, "hidden")]
    assert len(hs) == 2 and hs[0].shape == (8, 100)
    pen = reg.activity_of(hs, reg.cfg, False)
    if name == "activity_l1":
        expected = 0.3 * sum(h.detach().abs().sum() for h in hs) / 8
    else:
        expected = 0.3 * sum(torch.log(1 + 2.0 * h.detach() ** 2).sum() for h in hs) / 8
    assert pen.item() == pytest.approx(expected.item(), rel=1e-6)
    # dΩ/dh: α·sign(h)/B, or α·2γh/(1+γh²)/B
    (g,) = torch.autograd.grad(pen, hs[1])
    h = hs[1].detach()
    want = 0.3 * torch.sign(h) / 8 if name == "activity_l1" else 0.3 * 4.0 * h / (1 + 2.0 * h ** 2) / 8
    assert torch.allclose(g, want, atol=1e-7)


# ---------------------------------------------------------------- gradient-norm penalty
def _grad_norm_penalty(model, loss, x, y, **kw):
    """The regularizer's ``batch_penalty_of`` on one model's step, with the config's values."""
    reg = make("gradient_norm_penalty", **kw)
    return reg.batch_penalty_of(lone_batch(model, loss, x, y), reg.cfg, False)


def test_gradient_norm_penalty_full_mode_equals_the_closed_form_of_a_quadratic():
    # L(w) = ‖Xw − t‖²/(2n): ∇L = A w − c with A = XᵀX/n, c = Xᵀt/n, so
    # Ω = λ‖Aw − c‖² and ∇Ω = 2λA(Aw − c) (Barrett & Dherin 2021's implicit term, by hand)
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    loss = 0.5 * (model(x).squeeze(1) - t).pow(2).mean()
    pen = _grad_norm_penalty(model, loss, x, t, lam=0.3)
    a, c, w = x.T @ x / 8, x.T @ t / 8, model.weight.detach().squeeze(0)
    g = a @ w - c
    assert pen.item() == pytest.approx(0.3 * g.dot(g).item(), rel=1e-12)
    pen.backward()
    assert torch.allclose(model.weight.grad.squeeze(0), 2 * 0.3 * a @ g, rtol=1e-10, atol=0)


def _softmax_regression_grads(w, b, x, y):
    """∇ of the mean cross-entropy of softmax(Wx + b), by hand: ((P − Y)ᵀX/n, mean(P − Y))."""
    r = torch.softmax(x @ w.T + b, 1) - F.one_hot(y, w.shape[0]).to(x.dtype)
    return r.T @ x / len(y), r.mean(0)


def _sq(gs):
    return sum(g.pow(2).sum() for g in gs)


def test_gradient_norm_penalty_sgd_mode_is_the_mean_micro_batch_gradient_norm():
    # Smith et al. 2021: (1/k)Σⱼ‖∇L_j‖² = ‖∇L‖² + (1/k)Σⱼ‖∇L_j − ∇L‖² for k equal micro-batches
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    w, b = model.weight.detach(), model.bias.detach()
    parts = [_softmax_regression_grads(w, b, x[j:j + 4], y[j:j + 4]) for j in (0, 4, 8)]
    whole = _softmax_regression_grads(w, b, x, y)
    expected = sum(_sq(g) for g in parts) / 3
    variance = sum(_sq([gj - gi for gj, gi in zip(g, whole)]) for g in parts) / 3
    assert expected.item() == pytest.approx((_sq(whole) + variance).item(), rel=1e-12)

    def penalty(mode, k=3):
        loss = F.cross_entropy(model(x), y)
        return _grad_norm_penalty(model, loss, x, y, lam=0.2, mode=mode, micro_batches=k)

    assert penalty("sgd").item() == pytest.approx(0.2 * expected.item(), rel=1e-12)
    assert penalty("full").item() == pytest.approx(0.2 * _sq(whole).item(), rel=1e-12)
    assert penalty("sgd", k=1).item() == pytest.approx(penalty("full").item(), rel=1e-12)
    assert penalty("sgd", k=50).item() == pytest.approx(penalty("sgd", k=12).item(), rel=1e-12)  # one per example
    # its gradient (double backward) against central differences of the hand-written value
    pen = penalty("sgd")
    pen.backward()
    eps, numeric = 1e-6, torch.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            e = torch.zeros_like(w)
            e[i, j] = eps
            f = [sum(_sq(_softmax_regression_grads(w + s * e, b, x[k:k + 4], y[k:k + 4])) for k in (0, 4, 8))
                 for s in (1, -1)]
            numeric[i, j] = 0.2 * (f[0] - f[1]) / 3 / (2 * eps)
    assert torch.allclose(model.weight.grad, numeric, rtol=1e-6, atol=1e-9)


def test_gradient_norm_penalty_in_the_trainer_is_gradient_descent_on_the_modified_loss(tmp_path):
    # one full-batch step: w ← w − η∇(L + λ‖∇L‖²), recomputed here from the same initial weights
    from regexp.data import load_data
    from regexp.models import build_model
    from regexp.train.trainer import seed_everything, train

    cfg = compose("optimizer=sgd", "optimizer.lr=0.5", "regularizer=[gradient_norm_penalty]",
                  "regularizer.gradient_norm_penalty.lam=0.25", "trainer.batch_size=full", "trainer.epochs=1",
                  "data.n_train=64", "model.width=8", "trainer.threads=1", "trainer.progress=false")
    m = train(cfg, tmp_path)
    data = load_data(cfg.data, cfg.seed)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    x, y = data.split("train")
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    total = loss + 0.25 * sum(g.pow(2).sum() for g in grads)
    step = torch.autograd.grad(total, params)
    expected = {k: p.detach() - 0.5 * s for (k, p), s in zip(model.named_parameters(), step)}
    trained = torch.load(tmp_path / "model.pt", weights_only=True)
    for k, v in expected.items():
        assert torch.allclose(trained[k], v, atol=1e-6), k
    g2 = sum(g.pow(2).sum() for g in grads).item()
    (_, logged), = read_scalars(tmp_path)["penalty/gradient_norm_penalty"]
    assert logged == pytest.approx(0.25 * g2, rel=1e-5)
    assert m["status"] == "completed"


def test_small_step_gradient_descent_plus_the_penalty_follows_the_large_step():
    # Barrett & Dherin 2021: GD with step h follows the flow of L + (h/4)‖∇L‖² up to O(h²), so
    # step h/4 plus λ = (h − h/4)/4 (what the small step's own term lacks) lands near step h,
    # while plain step h/4 is O(h) away. Smooth (tanh) model, float64, same time h·steps = 2.
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    start = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def gd(lr, lam):
        model = copy.deepcopy(start)
        params = list(model.parameters())
        for _ in range(round(2.0 / lr)):
            loss = F.cross_entropy(model(x), y)
            step = torch.autograd.grad(loss + _grad_norm_penalty(model, loss, x, y, lam=lam), params)
            with torch.no_grad():
                for p, g in zip(params, step):
                    p -= lr * g
        return torch.cat([p.detach().flatten() for p in params])

    large, small, penalized = gd(0.2, 0.0), gd(0.05, 0.0), gd(0.05, 0.0375)
    assert (penalized - large).norm() < 0.25 * (small - large).norm()


# ---------------------------------------------------------------- early stopping
def test_early_stopping_counts_patience_on_the_monitor():
    reg = make("early_stopping", monitor="val_loss", patience=2)
    losses = [1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.6]
    stops = [reg.epoch_end(None, {"val_loss": v, "val_acc": 0.0}) for v in losses]
    assert stops == [False, False, False, False, False, True, False]
    acc = make("early_stopping", monitor="val_acc", patience=1, min_delta=0.05)
    assert [acc.epoch_end(None, {"val_acc": v}) for v in (0.5, 0.6, 0.62)] == [False, False, True]


@pytest.mark.parametrize("monitor", ["val_acc", "val_loss"])
def test_early_stopping_restores_the_best_validation_weights(tmp_path, monitor):
    from regexp.train.trainer import train

    cfg = compose("regularizer=[early_stopping]", "regularizer.early_stopping.patience=2",
                  f"regularizer.early_stopping.monitor={monitor}",
                  "data.n_train=300", "data.label_noise=0.5", "optimizer.lr=0.02", "trainer.epochs=40",
                  "trainer.threads=1", "trainer.progress=false", "logger.tensorboard=false")
    m = train(cfg, tmp_path)
    assert m["status"] == "completed"
    assert m["stopped_epoch"] == m["epochs"] < 40
    hist = m["history"]
    if monitor == "val_acc":
        best = max(hist, key=lambda r: (r["val_acc"], -r["val_loss"]))
    else:
        best = min(hist, key=lambda r: (r["val_loss"], -r["val_acc"]))
    assert m["final"] == best
    # stopped once val_acc had not improved for 2 evaluations after its best
    assert max(r["epoch"] for r in hist) >= best["epoch"] + 2
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    best_saved = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert all(torch.equal(saved[k], best_saved[k]) for k in saved)


# ---------------------------------------------------------------- ensembles and bagging
def test_bootstrap_resample_has_about_63_percent_unique_points():
    from regexp.regularizers.bootstrap import bootstrap_counts

    n = 20000
    c = bootstrap_counts(n, 3, torch.Generator().manual_seed(0))
    assert torch.all(c.sum(1) == n)
    unique = (c > 0).float().mean(1)
    assert torch.allclose(unique, torch.full((3,), 1 - (1 - 1 / n) ** n), atol=0.006)
    assert abs(1 - (1 - 1 / n) ** n - (1 - 1 / math.e)) < 1e-4


def test_ensemble_predicts_the_mean_member_probability_and_trains_members_separately():
    cfg = compose().model
    ctx = Context(10, 30, torch.device("cpu"), (1, 40), seed=3, model_cfg=cfg)
    from regexp.models import build_model

    torch.manual_seed(3)
    reg = make("ensemble", ctx, components=3, bootstrap=True)
    ens = reg.wrap_model(build_model(cfg, (1, 40), 10))
    members = list(ens.members)
    assert len(members) == 3
    assert not torch.equal(members[0].head.weight, members[1].head.weight)  # own seeds
    x = torch.randn(6, 1, 40)
    ens.eval()
    mean_p = sum(F.softmax(m(x), 1) for m in members) / 3
    assert torch.allclose(ens(x).exp(), mean_p, atol=1e-6)
    # training loss (bagging in a population, regexp/population/ensemble.py): per model k, the
    # mean over the batch of countsₖ[i] · CEₖ(i); with label smoothing ε, of its smoothed CE
    from regexp.population.ensemble import Bagging

    y, idx = torch.randint(0, 10, (6,)), torch.tensor([0, 5, 7, 7, 12, 29])
    logits = torch.stack([m(x) for m in members])  # (K, B, C)
    for eps in (0.0, 0.1):
        bag = Bagging(reg.counts, torch.full((3, 1), eps))
        bag.idx = idx.expand(3, -1)
        got = bag.loss(logits, y.expand(3, -1))
        want = torch.stack([(reg.counts[k, idx] * F.cross_entropy(logits[k], y, reduction="none",
                                                                  label_smoothing=eps)).mean() for k in range(3)])
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), eps


def test_ensemble_report_puts_members_beside_the_ensemble(tmp_path):
    from regexp.train.trainer import train

    cfg = compose("regularizer=[ensemble]", "regularizer.ensemble.components=2", "data.n_train=200",
                  "trainer.epochs=2", "trainer.threads=1", "trainer.progress=false",
                  "logger.tensorboard=false")
    m = train(cfg, tmp_path)
    e = m["extra"]
    assert e["ensemble/test_acc"] == pytest.approx(m["final"]["test_acc"])
    assert {"ensemble/member_mean_test_acc", "ensemble/member_mean_test_loss"} <= set(e)
    # the log of the mean probability is at most the mean log probability (Jensen)
    assert e["ensemble/test_loss"] <= e["ensemble/member_mean_test_loss"] + 1e-6
    # Goodfellow §7.11 on the members' Brier errors: E[ε̄²] = v/K + (K − 1)c/K
    v, c = e["ensemble/test_member_sq_error"], e["ensemble/test_member_error_cov"]
    assert e["ensemble/test_sq_error"] == pytest.approx(v / 2 + c / 2, rel=1e-9)


# ---------------------------------------------------------------- augmentation
def test_1d_shift_moves_the_signal_by_whole_positions():
    from regexp.regularizers.augmentation import shift_scale_1d

    x = torch.arange(10.0).repeat(3, 2, 1)  # (3, 2, 10)
    out = shift_scale_1d(x, torch.tensor([0.0, 2.0, -3.0]), torch.ones(3))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1, 0], torch.tensor([0, 0, 0, 1, 2, 3, 4, 5, 6, 7.0]))  # edge repeated
    assert torch.equal(out[2, 1], torch.tensor([3, 4, 5, 6, 7, 8, 9, 9, 9, 9.0]))
    # time scaling by 2 about the centre 4.5: out[t] = x[(t − 4.5)/2 + 4.5] (linear in t here)
    scaled = shift_scale_1d(x[:1], torch.zeros(1), torch.tensor([2.0]))
    assert torch.allclose(scaled[0, 0], (torch.arange(10.0) - 4.5) / 2 + 4.5)


def test_image_crop_and_flip():
    from regexp.regularizers.augmentation import augment, crop_2d, draws

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    out = crop_2d(x, 2, torch.tensor([2, 0]), torch.tensor([2, 4]))
    assert torch.equal(out[0], x[0])  # offset (pad, pad) is the original image
    padded = F.pad(x[1], (2, 2, 2, 2))
    assert torch.equal(out[1], padded[:, 0:5, 4:10])
    many = x.repeat(200, 1, 1, 1)
    flipped = augment(many, draws(len(many), True, 0, 0.0, True, many.device, many.dtype), 0)
    same = (flipped == x.repeat(200, 1, 1, 1)).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1).repeat(200, 1, 1, 1)).flatten(1).all(1)
    assert torch.all(same | mirrored) and 0.4 < mirrored.float().mean().item() < 0.6


# ---------------------------------------------------------------- adversarial training
def test_fgsm_moves_each_input_by_exactly_eps_in_sign_direction():
    from regexp.regularizers.adversarial import fgsm

    torch.manual_seed(0)
    model = Tiny().double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    x_adv = fgsm(model, x, y, 0.25)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    assert torch.all(g != 0)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.25), atol=1e-12)
    assert torch.equal(torch.sign(x_adv - x), torch.sign(g))
    assert all(p.grad is None for p in model.parameters())  # the parameters are not touched
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    # which examples a training step replaces: tests/test_population_transforms.py


# ---------------------------------------------------------------- transfer
def test_transfer_loads_saved_weights_and_freezes_all_but_the_head(tmp_path):
    torch.manual_seed(0)
    source = Tiny()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    model = Tiny()
    reg = make("transfer", run_dir=str(tmp_path))
    reg.attach(model)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    # a head for another number of classes keeps its fresh initialisation
    other = nn.Module()
    other.body, other.head = nn.Linear(4, 6), nn.Linear(6, 5)
    fresh = other.head.weight.clone()
    make("transfer", run_dir=str(tmp_path), freeze=False).attach(other)
    assert torch.equal(other.body.weight, source.body.weight) and torch.equal(other.head.weight, fresh)
    with pytest.raises(ConfigError, match="regularizer.transfer.run_dir"):
        make("transfer", run_dir=str(tmp_path / "missing")).attach(Tiny())


# ---------------------------------------------------------------- configs and bad input
def test_every_regularizer_composes_together():
    from regexp.config import validate

    names = sorted(set(REGULARIZERS) - {"transfer", "parameter_tying"})  # these need a run folder
    cfg = compose(f"regularizer=[{','.join(names)}]", "regularizer.dropout.p=0.3")
    validate(cfg)
    assert list(cfg.regularizer) == names and cfg.regularizer.dropout.p == 0.3


@pytest.mark.parametrize("override,key", [
    ("regularizer.dropout.p=1.0", "regularizer.dropout.p"),
    ("regularizer.weight_decay.lam=-1", "regularizer.weight_decay.lam"),
    ("regularizer.input_noise.sigma=-0.1", "regularizer.input_noise.sigma"),
    ("regularizer.weight_noise.sigma=-0.1", "regularizer.weight_noise.sigma"),
    ("regularizer.soft_weight_sharing.components=0", "regularizer.soft_weight_sharing.components"),
    ("regularizer.ensemble.components=0", "regularizer.ensemble.components"),
    ("regularizer.dropconnect.p=1.5", "regularizer.dropconnect.p"),
    ("regularizer.l1.lam=-0.5", "regularizer.l1.lam"),
    ("regularizer.early_stopping.monitor=val_f1", "regularizer.early_stopping.monitor"),
    ("regularizer.gradient_norm_penalty.mode=batch", "regularizer.gradient_norm_penalty.mode"),
    ("regularizer.gradient_norm_penalty.micro_batches=0", "regularizer.gradient_norm_penalty.micro_batches"),
    ("regularizer.gradient_norm_penalty.lam=-1", "regularizer.gradient_norm_penalty.lam"),
])
def test_bad_parameters_give_clear_errors(override, key):
    from regexp.config import validate

    group = key.split(".")[1]
    cfg = compose(f"regularizer=[{group}]", override)
    with pytest.raises(ConfigError, match=f"^{key}=.* is invalid: expected"):
        validate(cfg)


def test_soft_weight_sharing_logs_its_mixture_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from regexp.train.trainer import train

    cfg = compose("regularizer=[weight_decay,soft_weight_sharing]", "regularizer.soft_weight_sharing.components=3",
                  "regularizer.soft_weight_sharing.quantize=true", "data.n_train=200", "trainer.epochs=1",
                  "trainer.threads=1", "trainer.progress=false")
    m = train(cfg, tmp_path)
    acc = EventAccumulator(str(tmp_path)).Reload()
    tags = set(acc.Tags()["scalars"])
    for j in range(3):
        assert {f"soft_weight_sharing/pi_{j}", f"soft_weight_sharing/mu_{j}", f"soft_weight_sharing/sigma_{j}"} <= tags
    assert {"penalty/soft_weight_sharing", "penalty/weight_decay"} <= tags
    assert m["extra"]["soft_weight_sharing/distinct_values"] <= 3
    assert (tmp_path / "quantized_model.pt").is_file()
