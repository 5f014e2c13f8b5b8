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


@pytest.mark.parametrize("scheme, variance", [
    ("xavier", lambda fi, fo: 2.0 / (fi + fo)),
    ("he", lambda fi, fo: 2.0 / fi),
    ("normal", lambda fi, fo: 0.05 ** 2),
])
def test_init_variances(scheme, variance):
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 300)
    init_weights(layer, scheme, std=0.05)
    w = layer.weight
    assert w.var().item() == pytest.approx(variance(400, 300), rel=0.03)
    assert torch.equal(layer.bias, torch.zeros(300))
    if scheme == "xavier":
        assert w.abs().max() <= math.sqrt(6 / 700)


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
