"""Every model runs forward and backward on signals and images; inits have their variances."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from regexp.config import CNNConfig, MLPConfig, TransformerConfig
from regexp.models import NORMS, build_model, count_params, sites
from regexp.models.init import init_weights

SHAPES = [(1, 40), (1, 28, 28), (3, 32, 32)]


def cfg(schema, **kw):
    return OmegaConf.merge(OmegaConf.structured(schema), kw)


CASES = ([cfg(MLPConfig, norm=n, activation=a) for n in NORMS["mlp"] for a in ("relu", "tanh", "sigmoid", "gelu")]
         + [cfg(CNNConfig, norm=n, pool=p, channels=[4, 8]) for n in NORMS["cnn"] for p in ("max", "avg", "none")]
         + [cfg(TransformerConfig, embed_dim=16, heads=2, depth=1)])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mcfg", CASES, ids=lambda c: f"{c.name}-{c.get('norm')}-{c.get('activation', c.get('pool'))}")
def test_forward_backward(mcfg, shape):
    torch.manual_seed(0)
    model = build_model(mcfg, shape, 10)
    x = torch.randn(6, *shape)
    out = model(x)
    assert out.shape == (6, 10)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert len(sites(model, "input")) == 1 and len(sites(model, "hidden")) >= 1


def test_mlp_shape_follows_width_and_depth():
    model = build_model(cfg(MLPConfig, width=7, depth=3), (1, 40), 10)
    assert count_params(model) == (40 * 7 + 7) + 2 * (7 * 7 + 7) + (7 * 10 + 10)


UNIFORM_KURTOSIS, NORMAL_KURTOSIS = 1.8, 3.0  # E[w⁴]/E[w²]² of U(−b, b) and of N(0, σ²)
# /work/shared/reference.md "Initialization": (variance, bound of a uniform or None for a normal)
# as functions of fan-in and fan-out; uniform: U(−a, a) has variance a²/3.
INIT_FORMULAS = {
    "xavier": (lambda fi, fo: 2 / (fi + fo), lambda fi, fo: math.sqrt(6 / (fi + fo))),
    "xavier_normal": (lambda fi, fo: 2 / (fi + fo), None),
    "he": (lambda fi, fo: 2 / fi, None),
    "he_uniform": (lambda fi, fo: 2 / fi, lambda fi, fo: math.sqrt(6 / fi)),
    "normal": (lambda fi, fo: 0.05 ** 2, None),
    "uniform": (lambda fi, fo: 0.3 ** 2 / 3, lambda fi, fo: 0.3),
}
# (layer, fan_in, fan_out): a convolution's fans count the kernel's taps
LAYERS = [
    (lambda: torch.nn.Linear(400, 300), 400, 300),
    (lambda: torch.nn.Conv1d(64, 96, 7), 64 * 7, 96 * 7),
    (lambda: torch.nn.Conv2d(32, 64, 5), 32 * 25, 64 * 25),
]


@pytest.mark.parametrize("layer, fan_in, fan_out", LAYERS, ids=["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("scheme", INIT_FORMULAS)
def test_init_matches_its_formula(scheme, layer, fan_in, fan_out):
    torch.manual_seed(0)
    layer = layer()
    init_weights(layer, scheme, std=0.05, a=0.3)
    w = layer.weight.double()
    variance, bound = INIT_FORMULAS[scheme]
    assert w.var().item() == pytest.approx(variance(fan_in, fan_out), rel=0.03)
    assert w.mean().item() == pytest.approx(0.0, abs=0.02 * math.sqrt(variance(fan_in, fan_out)))
    kurtosis = (w ** 4).mean().item() / (w ** 2).mean().item() ** 2
    if bound is None:
        assert kurtosis == pytest.approx(NORMAL_KURTOSIS, rel=0.05)
    else:
        assert kurtosis == pytest.approx(UNIFORM_KURTOSIS, rel=0.05)
        b = bound(fan_in, fan_out)
        assert w.abs().max().item() <= b and w.abs().max().item() >= 0.99 * b
    assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_uniform_without_a_is_glorots_heuristic():
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 300)
    init_weights(layer, "uniform")  # a = 1/√n_in (Glorot & Bengio 2010, eq. 1)
    assert layer.weight.abs().max().item() == pytest.approx(1 / math.sqrt(400), rel=0.01)
    assert layer.weight.abs().max().item() <= 1 / math.sqrt(400)
    mcfg = cfg(MLPConfig, width=300, depth=1, init="uniform", init_a=0.2)
    assert build_model(mcfg, (1, 40), 10).hidden[0].weight.abs().max().item() == pytest.approx(0.2, rel=0.01)


def test_unknown_init_names_the_valid_ones():
    from regexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.init='glorot' is invalid: expected one of default, xavier, "
                                          r"xavier_normal, he, he_uniform, normal, uniform, zeros"):
        init_weights(torch.nn.Linear(3, 2), "glorot")


def test_zero_init_never_breaks_symmetry():
    torch.manual_seed(0)
    model = build_model(cfg(MLPConfig, width=5, depth=1, init="zeros"), (1, 40), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(32, 1, 40)), torch.randint(0, 10, (32,))).backward()
        opt.step()
    w = model.hidden[0].weight
    assert torch.equal(w, w[:1].expand_as(w))  # every hidden unit is still the same
