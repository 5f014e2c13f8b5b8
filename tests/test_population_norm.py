"""Normalized and residual MLPs in a population against their lone runs (tolerance as in
test_population.py: |a - b| <= 1e-5 + 1e-4·|b| on every parameter and batch-norm statistic
after 2 epochs of float32 training, metrics within a relative 1e-4)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from regexp.models.mlp import MLP
from regexp.population.compat import bucket_widths, incompatibility, mlp_cost
from regexp.population.stacked_mlp import StackedMLP
from regexp.sweep import point_name
from test_population import _assert_same_run, _pop_and_lone
from test_population_stop_transfer import _interrupt_resume_and_lone

# three widths in one bucket, seeds and learning rates per member
POINTS = [{"model.width": 32, "optimizer.lr": 0.02, "seed": 0},
          {"model.width": 36, "optimizer.lr": 0.05, "seed": 1},
          {"model.width": 40, "optimizer.lr": 0.01, "seed": 2}]


@pytest.mark.parametrize("overrides", [
    ["model.norm=batch", "optimizer=momentum", "regularizer=[weight_decay,dropout]",
     "regularizer.dropout.p=0.2", "regularizer.weight_decay.lam=0.001"],
    ["model.norm=layer", "optimizer=adam", "model.activation=sigmoid", "regularizer=[weight_decay,dropout]",
     "regularizer.dropout.p=0.2", "regularizer.weight_decay.lam=0.001"],
    ["model.residual=true", "optimizer=adam", "regularizer=[dropout]", "regularizer.dropout.p=0.1"],
    ["model.residual=true", "model.norm=batch", "optimizer=momentum", "model.activation=tanh"],
], ids=["batch", "layer", "residual", "residual_batch"])
def test_normalized_and_residual_members_match_lone_runs(compose_cfg, tmp_path, overrides):
    assert incompatibility(compose_cfg(overrides)) is None
    # one bucket; with skips the 40-wide member has one on its first layer too (40 inputs)
    assert bucket_widths([32, 36, 40], cost=mlp_cost(40, 2, 10)) == [[32, 36, 40]]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, POINTS)
    for p, a, b in zip(POINTS, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # model.pt holds the running statistics too
        _assert_same_best(tmp_path, p)  # so does the best epoch's state
    assert len({m["final"]["train_loss"] for m in pop}) == 3


def _assert_same_best(tmp_path, point, atol: float = 1e-5) -> None:
    best = [torch.load(tmp_path / d / point_name(point) / "best_model.pt", weights_only=True) for d in ("pop", "lone")]
    assert best[0].keys() == best[1].keys()
    for k in best[1]:
        torch.testing.assert_close(best[0][k], best[1][k], atol=atol, rtol=1e-4)


def test_batch_norm_population_resumes_exactly(compose_cfg, tmp_path, monkeypatch):
    # interrupted mid-epoch 2: the running statistics and the best state come back from checkpoints.
    # (Not adam: the bias before a batch norm has a gradient of pure rounding noise, which adam's
    # normalized step turns into lr-sized moves that differ between any two summation orders.)
    stopped, _, _ = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, [
        "model.norm=batch", "optimizer=momentum", "trainer.epochs=3"], POINTS[:2], epochs_done=1)
    assert [m["status"] for m in stopped] == ["interrupted"] * 2


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_padded_units_stay_inert_through_the_norm(norm):
    # a narrow member next to a wide one: its padded units output 0 and get zero gradient,
    # and it computes (train and eval mode) what its lone model computes
    torch.manual_seed(0)
    models = [MLP(5, 3, 4, 2, "sigmoid", norm), MLP(5, 3, 7, 2, "sigmoid", norm)]
    lone = [MLP(5, 3, 4, 2, "sigmoid", norm)]
    lone[0].load_state_dict(models[0].state_dict())
    net = StackedMLP(models, [4, 7], 7, "sigmoid", torch.device("cpu"))
    x = torch.randn(2, 16, 5)
    out = net.forward(x)
    ref = lone[0](x[0])
    torch.testing.assert_close(out[0], ref, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    for name, p, _ in net.named_params():
        if p.dim() == 3 and p.shape[1] == 1 and name.startswith("hidden"):  # biases and norm parameters
            assert torch.equal(p.grad[0, 0, 4:], torch.zeros(3)), name
            assert torch.equal(p[0, 0, 4:], torch.zeros(3)), name
    if norm == "batch":  # the running statistics moved as the lone module's did
        state = net.member_state(0)
        for k, v in lone[0].state_dict().items():
            torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5)
        lone[0].eval()
        ev = net.eval_logits(x, 16)
        torch.testing.assert_close(ev[0].t(), lone[0](x[0]), atol=1e-6, rtol=1e-5)
        assert isinstance(lone[0].hidden[1], nn.BatchNorm1d)


# uneven hidden widths, each layer padded to the bucket's widest: [40, 20, 20] has skips on
# layers 1 and 3 (40 inputs), [32, 16, 16] on layer 3, [40, 24, 20] on layer 1
UNEVEN = [{"model.widths": [40,20,20], "optimizer.lr": 0.02, "seed": 0},
          {"model.widths": [32,16,16], "optimizer.lr": 0.05, "seed": 1},
          {"model.widths": [40,24,20], "optimizer.lr": 0.01, "seed": 2}]


@pytest.mark.parametrize("overrides", [
    ["optimizer=momentum", "regularizer=[weight_decay,dropout,weight_noise]", "regularizer.dropout.p=0.2",
     "regularizer.weight_decay.lam=0.001", "regularizer.weight_noise.sigma=0.01"],
    ["optimizer=adam", "model.norm=layer", "model.residual=true", "regularizer=[dropout]", "regularizer.dropout.p=0.1"],
    ["optimizer=momentum", "model.norm=batch", "model.residual=true", "model.activation=tanh"],
], ids=["plain", "layer_residual", "batch_residual"])
def test_uneven_widths_members_match_lone_runs(compose_cfg, tmp_path, overrides):
    from regexp.population.compat import bucket_widths, widths_cost

    shapes = [(40, 20, 20), (32, 16, 16), (40, 24, 20)]
    assert bucket_widths(shapes, cost=widths_cost(40, 10)) == [sorted(shapes, key=widths_cost(40, 10))]
    assert incompatibility(compose_cfg(overrides + ["model.widths=[40,20,20]"])) is None
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, UNEVEN)
    for p, a, b in zip(UNEVEN, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert len({m["final"]["train_loss"] for m in pop}) == 3
