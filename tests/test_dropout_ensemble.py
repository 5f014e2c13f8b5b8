"""Goodfellow §7.12: dropout's sub-network ensemble enumerated, against weight scaling and MC."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from regexp.experiments.dropout_ensemble import all_masks, mask_ensemble, mc_average
from regexp.models.mlp import MLP
from regexp.models.sites import sites
from regexp.sweep import read_csv
from tests.test_gallery import QUICK, assert_png, run, tb_images


def by_hand(model, x, p):
    """Both means over masks written out: each sub-network by zeroing units in plain torch ops."""
    lin = [m for m in model.hidden if isinstance(m, torch.nn.Linear)]
    widths = [m.out_features for m in lin]
    arith, log_geo = 0, 0
    for bits in itertools.product([0.0, 1.0], repeat=sum(widths)):
        mu = torch.tensor(bits, dtype=torch.float64)
        h, col = x.double(), 0
        for layer, w in zip(lin, widths):
            h = torch.relu(h @ layer.weight.double().T + layer.bias.double()) * mu[col:col + w] / (1 - p)
            col += w
        prob = F.softmax(h @ model.head.weight.double().T + model.head.bias.double(), 1)
        weight = (1 - p) ** mu.sum() * p ** (len(mu) - mu.sum())
        arith = arith + weight * prob
        log_geo = log_geo + weight * prob.log()
    return arith, F.softmax(log_geo, 1)


def net(depth, width, seed=0):
    torch.manual_seed(seed)
    return MLP(5, 3, width, depth).eval()


def test_all_masks_lists_every_bit_pattern_once():
    m = all_masks(3)
    assert m.shape == (8, 3) and len({tuple(r) for r in m.tolist()}) == 8


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_single_softmax_layer_weight_scaling_is_the_renormalised_geometric_mean(p):
    model, x = net(1, 6), torch.randn(9, 5)
    arith, geo = mask_ensemble(model, x, p)
    want_arith, want_geo = by_hand(model, x, p)
    assert torch.allclose(arith, want_arith, atol=1e-12) and torch.allclose(geo, want_geo, atol=1e-12)
    with torch.no_grad():
        scaled = F.softmax(model(x), 1).double()
    assert torch.allclose(geo, scaled, atol=1e-12)  # Goodfellow §7.12: exact for a softmax layer
    assert (arith - scaled).abs().max() > 1e-3  # the arithmetic mean is another prediction
    if p == 0.5:  # uniform masks: the plain (∏_μ p(y|x,μ))^(1/2^d), renormalised
        h = torch.relu(model.hidden[0](x)).double()
        logs = torch.stack([F.log_softmax((m * h / 0.5) @ model.head.weight.double().T
                                          + model.head.bias.double(), 1) for m in all_masks(6)])
        assert torch.allclose(geo, F.softmax(logs.sum(0) / 2 ** 6, 1), atol=1e-12)


def test_a_second_nonlinear_layer_makes_weight_scaling_an_approximation():
    model, x = net(2, 4, seed=1), torch.randn(9, 5)
    arith, geo = mask_ensemble(model, x, 0.5, chunk=16)
    want_arith, want_geo = by_hand(model, x, 0.5)
    assert torch.allclose(arith, want_arith, atol=1e-12) and torch.allclose(geo, want_geo, atol=1e-12)
    with torch.no_grad():
        scaled = F.softmax(model(x), 1).double()
    assert (geo - scaled).abs().max() > 1e-4
    for s in sites(model, "hidden"):
        s.p = 0.5
    mc = mc_average(model, x, 1500, 0)  # unbiased for the arithmetic mean
    assert (mc - arith).abs().max() < 0.04
    assert torch.equal(mc_average(model, x, 20, 3), mc_average(model, x, 20, 3))  # seeded: the table repeats


def test_dropout_ensemble_cli_inference_and_width_sweep(compose_cfg, tmp_path):
    overrides = [*QUICK, "trainer.epochs=1", "extra.enum_width=3", "extra.seeds=[0]", "extra.widths=[4]",
                 "extra.mc_samples=[2]"]
    run(compose_cfg, "dropout_ensemble", overrides, tmp_path)
    assert_png(tmp_path / "dropout_ensemble.png")
    assert "figures/dropout_ensemble" in tb_images(tmp_path)
    rules = {r["rule"]: r for r in read_csv(tmp_path / "inference.csv")}
    assert list(rules) == ["arithmetic mean (all masks)", "geometric mean (all masks)", "weight scaling", "MC T=2"]
    assert float(rules["arithmetic mean (all masks)"]["kl_from_arithmetic"]) == 0.0
    assert float(rules["geometric mean (all masks)"]["kl_from_geometric"]) == 0.0
    widths = read_csv(tmp_path / "width.csv")
    assert [(r["dropout"], r["model.width"]) for r in widths] == [("none", "4"), ("dropout", "4")]
    summary = read_csv(tmp_path / "width_summary.csv")
    assert [(r["width"], r["none_test_error"], r["dropout_test_error"]) for r in summary] == [
        ("4", widths[0]["test_error"], widths[1]["test_error"])]


def test_dropout_ensemble_refuses_too_many_masks(compose_cfg, tmp_path):
    from regexp.errors import ConfigError

    with pytest.raises(ConfigError, match="extra.enum_width"):
        run(compose_cfg, "dropout_ensemble", ["extra.enum_width=9"], tmp_path)
