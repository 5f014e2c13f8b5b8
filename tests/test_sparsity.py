"""Sparse representations: the KL activity penalty, and the sparsity every run records."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import read_scalars
from regexp.data import load_data
from regexp.errors import ConfigError
from regexp.models.mlp import MLP
from regexp.models.sites import sites
from regexp.regularizers import REGULARIZERS
from regexp.regularizers.base import Context
from regexp.train.sparsity import NEAR_ZERO, count_sparsity, zero_counts
from regexp.train.trainer import train


def make_kl(**cfg):
    schema = OmegaConf.structured(REGULARIZERS["activity_kl"].Config)
    return REGULARIZERS["activity_kl"](OmegaConf.merge(schema, cfg), Context(3, 100, torch.device("cpu"), (1, 6)))


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_kl_penalty_value_and_gradient(activation):
    torch.manual_seed(0)
    model = MLP(6, 3, width=5, depth=2, act=activation).double()
    reg = make_kl(alpha=0.7, rho=0.1)
    reg.attach(model)
    for s in sites(model, "hidden"):
        s.record = True
    model(torch.randn(8, 1, 6, dtype=torch.float64))
    # leaves, to read the penalty's gradient in the activations
    hs = [s.last.detach().requires_grad_() for s in sites(model, "hidden")]
    value = reg.activity_of(hs, reg.cfg, False)
    value.backward()
    want = 0.0
    for h in hs:
        a = h.detach().numpy()
        q = a if activation == "sigmoid" else 1 - np.exp(-a)
        r = np.clip(q.mean(0), 1e-6, 1 - 1e-6)  # a ReLU unit off on the whole batch: ρ̂ = 1e-6
        want += 0.7 * np.sum(0.1 * np.log(0.1 / r) + 0.9 * np.log(0.9 / (1 - r)))
        dq = np.ones_like(a) if activation == "sigmoid" else np.exp(-a)
        kl_grad = np.where(q.mean(0) > 1e-6, -0.1 / r + 0.9 / (1 - r), 0.0)  # no gradient when clamped
        grad = 0.7 / len(a) * kl_grad * dq  # dΩ/dh_nj = α/B · KL'(ρ̂_j) · q'(h_nj)
        np.testing.assert_allclose(h.grad.numpy(), grad, rtol=1e-10)
    assert value.item() == pytest.approx(want, rel=1e-10)


def test_kl_penalty_is_zero_at_the_target_rate():
    model = MLP(6, 3, width=2, depth=1, act="sigmoid")
    reg = make_kl(rho=0.25)
    reg.attach(model)
    rates = torch.tensor([[0.5, 0.0], [0.0, 0.5]])  # both units' mean is 0.25
    assert reg.activity_of([rates], reg.cfg, False).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_penalty_refuses_activations_that_are_no_rates():
    with pytest.raises(ConfigError, match="this model's are tanh: expected model.activation one of sigmoid, relu"):
        make_kl().attach(MLP(6, 3, width=2, depth=1, act="tanh"))


def test_count_sparsity_on_a_constructed_model():
    model = MLP(1, 2, width=4, depth=1)
    with torch.no_grad():
        model.hidden[0].weight.copy_(torch.tensor([[1.0], [-1.0], [0.0], [1e-4]]))
        model.hidden[0].bias.zero_()
    x = torch.tensor([2.0, -3.0, 0.5]).view(3, 1, 1)
    # h = relu([x, −x, 0, 1e-4·x]): x=2 → [2, 0, 0, 2e-4]; x=−3 → [0, 3, 0, 0]; x=0.5 → [.5, 0, 0, 5e-5]
    with count_sparsity(model) as frac:
        model(x[:2])
        model(x[2:])  # two forward passes, as the evaluation's chunks: counted together
    assert frac["zero_frac"].item() == 7 / 12  # 2 + 3 + 2
    assert frac["near_zero_frac"].item() == 9 / 12  # and 2e-4, 5e-5
    with count_sparsity(model, enabled=False) as off:
        model(x)
    assert off == {}
    with count_sparsity(MLP(1, 2, width=4, depth=0)) as none:  # no hidden units: nothing to say
        MLP(1, 2, width=4, depth=0)(x)
    assert none == {}


def test_every_run_records_the_test_sparsity(compose_cfg, tmp_path):
    cfg = compose_cfg(["data.n_train=200", "trainer.epochs=2", "trainer.progress=false", "trainer.threads=1",
                       "model.width=16", "trainer.eval_batch_size=128"])
    metrics = train(cfg, tmp_path)
    # the model's function written out by hand on the test set, from the saved weights
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    x, _ = load_data(cfg.data, cfg.seed).split("test")
    h, acts = x.flatten(1), []
    for i in (0, 3):  # Linear, ReLU, Site per hidden layer
        h = F.relu(F.linear(h, state[f"hidden.{i}.weight"], state[f"hidden.{i}.bias"]))
        acts.append(h)
    a = torch.cat([t.flatten() for t in acts])
    zero, near = (a == 0).double().mean().item(), (a.abs() < NEAR_ZERO).double().mean().item()
    assert 0 < zero <= near < 1
    final = metrics["final"]
    assert final["test_zero_frac"] == pytest.approx(zero, abs=1e-12)
    assert final["test_near_zero_frac"] == pytest.approx(near, abs=1e-12)
    assert json.loads((tmp_path / "metrics.json").read_text())["final"] == final
    assert all("test_zero_frac" in row and "val_zero_frac" not in row for row in metrics["history"])
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["sparsity/test_zero_frac"]] == [1, 2]
    assert scalars["sparsity/test_zero_frac"][-1][1] == pytest.approx(zero, rel=1e-6)
    assert scalars["sparsity/test_near_zero_frac"][-1][1] == pytest.approx(near, rel=1e-6)


def test_dead_units_and_heatmap_order():
    from regexp.experiments.sparse_representations import dead_fraction, heatmap_order

    a = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert dead_fraction([a, torch.zeros(2, 1)]) == 2 / 4  # unit 0 of the first layer, the second's only one
    ordered = heatmap_order(np.array([[1.0, 0.0, 5.0], [3.0, 1.0, 0.0]]), np.array([7, 2]))
    np.testing.assert_array_equal(ordered, [[0.0, 3.0, 1.0], [5.0, 1.0, 0.0]])  # class 2 first; means 2.5, 2, .5


def test_sparse_representations_experiment_tables_match_the_runs(compose_cfg, tmp_path):
    from test_gallery import QUICK, assert_png, run

    from regexp.sweep import read_csv

    run(compose_cfg, "sparse_representations", QUICK + ["model.width=16", "trainer.epochs=1", "sweep.seeds=[0]",
                                                        "extra.examples=10",
                                                        "~extra.variants",
                                                        "+extra.variants={none: {}, kl: {activity_kl: {}}}"],
        tmp_path)
    assert_png(tmp_path / "sparse_representations.png")
    table = {r["variant"]: r for r in read_csv(tmp_path / "results.csv")}
    assert list(table) == ["none", "kl"]
    for v in table:
        metrics = json.loads((tmp_path / f"variant={v}" / "seed=0" / "metrics.json").read_text())
        assert float(table[v]["test_zero_frac_mean"]) == pytest.approx(metrics["final"]["test_zero_frac"])
        assert float(table[v]["test_error_mean"]) == pytest.approx(1 - metrics["final"]["test_acc"])
    kl = json.loads((tmp_path / "variant=kl" / "seed=0" / "metrics.json").read_text())
    assert list(kl["config"]["regularizer"]) == ["activity_kl"]
    assert f"| kl | 1 | {float(table['kl']['test_error_mean']):.4f} ± 0.0000 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("kind", ["relu", "tanh", "negative"])
def test_zero_counts_equal_counting_with_bool_tensors_at_the_thresholds(kind):
    """The float-sign counts are the plain comparisons' exact integers, with values at 0, just
    below and exactly at NEAR_ZERO, and with a padding mask."""
    torch.manual_seed(0)
    a = torch.randn(4, 30, 70)
    a = {"relu": torch.relu(a), "tanh": torch.tanh(a * 1e-3), "negative": -torch.relu(a)}[kind]
    below = torch.nextafter(torch.tensor(NEAR_ZERO), torch.tensor(0.0))
    a[0, 0, :5], a[1, 1, :5], a[2, 2, :5] = NEAR_ZERO, below, 0.0
    real = (torch.rand(4, 30, 1) > 0.3).float()
    want = torch.stack([((a == 0) & (real > 0)).sum((1, 2)), ((a.abs() < NEAR_ZERO) & (real > 0)).sum((1, 2))], 1)
    assert torch.equal(zero_counts(a, (1, 2), real), want)
    assert torch.equal(zero_counts(a, (0, 1, 2)), torch.stack([(a == 0).sum(), (a.abs() < NEAR_ZERO).sum()]))
    assert want[:, 1].sum() > 0 and (kind != "relu" or want[:, 0].sum() > 0)
    # a mask that varies along reduced dims too (a CNN's channels, (1, M, C, 1)), and one as
    # large as ``a``; the values at -NEAR_ZERO and just above it
    a[3, 3, :5], a[3, 4, :5] = -NEAR_ZERO, -below
    b = a.view(2, 2, 30, 70).transpose(0, 1)  # (N, M, C, L), not contiguous
    chan = (torch.rand(1, 2, 30, 1) > 0.3).float()
    hit = chan.expand_as(b) > 0
    want = torch.stack([((b == 0) & hit).sum((0, 2, 3)), ((b.abs() < NEAR_ZERO) & hit).sum((0, 2, 3))], 1)
    assert torch.equal(zero_counts(b, (0, 2, -1), chan), want)
    assert torch.equal(zero_counts(b, (0, 2, 3), chan.expand_as(b)), want)
