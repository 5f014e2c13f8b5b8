"""Activity penalties (L1, Student-t, KL sparsity) in the population engine.

Each penalty's formula is written once (``activity_of``): on the stacked (M, B, width)
activations it gives every member the value and gradient its lone formula gives on that
member's own (B, width) activations, padded units never counting; and a member trained in a
population, with its own width and hyperparameters, ends as its lone run does.

Stated tolerances (float32): the stacked formula within 1e-6 relative of the lone one (the
same operations, reduced in another order); a member after 2 epochs within
|a - b| <= 1e-5 + 1e-4·|b| of its lone ``train()`` run (the population tests' tolerance).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from regexp.models.mlp import MLP
from regexp.population import Options, train_population, use_population
from regexp.population.compat import incompatibility
from regexp.regularizers import REGULARIZERS
from regexp.regularizers.base import Context
from regexp.sweep import point_config, point_name
from regexp.train.trainer import train
from test_population import BASE, _assert_same_run, _pop_and_lone

SMALL = ["data.n_train=300", "trainer.batch_size=50"]
HP = {"activity_l1": {"alpha": [0.3, 0.05, 1.0]},
      "activity_student_t": {"alpha": [0.3, 0.05, 1.0], "gamma": [2.0, 0.5, 1.0]},
      "activity_kl": {"alpha": [0.7, 0.1, 2.0], "rho": [0.1, 0.3, 0.05]}}


def _attached(name: str, activation: str, hp: dict):
    cls = REGULARIZERS[name]
    reg = cls(OmegaConf.structured(cls.Config(**hp)), Context(3, 100, torch.device("cpu"), (1, 6)))
    reg.attach(MLP(6, 3, width=5, depth=2, act=activation))  # KL reads the activation off the model
    return reg


@pytest.mark.parametrize("name,activation", [("activity_l1", "relu"), ("activity_student_t", "tanh"),
                                             ("activity_kl", "relu"), ("activity_kl", "sigmoid")])
def test_stacked_formula_is_each_members_lone_formula_values_and_gradients(name, activation):
    torch.manual_seed(0)
    widths, width, batch = [5, 3, 4], 5, 7
    hp = HP[name]
    units = (torch.arange(width)[None, None, :] < torch.tensor(widths)[:, None, None]).float()
    act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation]
    # padded entries hold garbage, not zeros: the mask alone must keep them out
    hs = [act(torch.randn(3, batch, width)).requires_grad_() for _ in range(2)]
    hs[0].data[:, :, 3:] = act(torch.randn(3, batch, 2)) + 0.5
    reg = _attached(name, activation, {k: v[0] for k, v in hp.items()})
    pen = reg.activity_of(hs, SimpleNamespace(**{k: torch.tensor(v) for k, v in hp.items()}), True, units)
    assert pen.shape == (3,)
    pen.sum().backward()  # members are independent: the sum's gradient is each one's own
    for m, w in enumerate(widths):
        own = [h.detach()[m, :, :w].clone().requires_grad_() for h in hs]
        lone = reg.activity_of(own, SimpleNamespace(**{k: v[m] for k, v in hp.items()}), False)
        torch.testing.assert_close(pen[m], lone.detach(), rtol=1e-6, atol=0)
        grads = torch.autograd.grad(lone, own)
        for h, g in zip(hs, grads):
            torch.testing.assert_close(h.grad[m, :, :w], g, rtol=1e-6, atol=1e-9)
            assert torch.count_nonzero(h.grad[m, :, w:]) == 0  # padded units: no gradient


CASES = {  # name -> (shared overrides, per-member points: different widths and values)
    "activity_l1": (["regularizer=[activity_l1]"],
                    [{"model.width": 16, "regularizer.activity_l1.alpha": 1e-2, "seed": 0},
                     {"model.width": 12, "regularizer.activity_l1.alpha": 1e-3, "seed": 1}]),
    "activity_student_t": (["regularizer=[activity_student_t]", "model.activation=tanh"],
                           [{"model.width": 16, "regularizer.activity_student_t.alpha": 1e-2,
                             "regularizer.activity_student_t.gamma": 2.0, "seed": 0},
                            {"model.width": 10, "regularizer.activity_student_t.alpha": 3e-2,
                             "regularizer.activity_student_t.gamma": 0.5, "seed": 1}]),
    "activity_kl": (["regularizer=[activity_kl]", "model.activation=sigmoid"],
                    [{"model.width": 16, "regularizer.activity_kl.alpha": 1e-2,
                      "regularizer.activity_kl.rho": 0.05, "seed": 0},
                     {"model.width": 12, "regularizer.activity_kl.alpha": 5e-2,
                      "regularizer.activity_kl.rho": 0.2, "seed": 1},
                     {"model.width": 8, "regularizer.activity_kl.alpha": 0.0,
                      "regularizer.activity_kl.rho": 0.1, "seed": 2}]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_activity_penalty_per_member_matches_lone_runs(compose_cfg, tmp_path, name):
    overrides, points = CASES[name]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + ["optimizer=adam"] + overrides, points)
    assert incompatibility(base) is None and use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # includes the penalty/<name> curve
    assert pop[0]["history"] != pop[1]["history"]


def test_activity_penalty_keeps_the_hand_written_step_off(compose_cfg, tmp_path, monkeypatch):
    # the hand-written backward knows the cross-entropy only: a relu bucket with an activity
    # penalty must take the autograd path (whose forward records the activations)
    from regexp.population.stacked_mlp import StackedMLP

    def refuse(*a, **k):
        raise AssertionError("manual_step with an activity penalty")

    monkeypatch.setattr(StackedMLP, "manual_step", refuse)
    overrides, points = CASES["activity_l1"]
    base = compose_cfg(BASE + SMALL + ["trainer.epochs=1"] + overrides)
    assert [r["status"] for r in train_population(base, points, tmp_path / "pop")] == ["completed"] * 2


@pytest.mark.parametrize("loop_width", [0, 1])
def test_relu_kl_with_dropout_in_both_forms_matches_lone_runs(compose_cfg, tmp_path, loop_width):
    # relu: a padded unit's rate is squash(0) = 0, which only the mask keeps out; dropout: the
    # penalty reads the activations after the dropout mask, as a lone run's Site records them;
    # loop_width=1: the member-by-member form pads each member's activations itself
    base = compose_cfg(BASE + SMALL + ["trainer.epochs=1", "regularizer=[dropout,activity_kl]",
                                       "regularizer.dropout.p=0.2", "regularizer.activity_kl.alpha=0.05"])
    points = [{"model.width": 20, "regularizer.activity_kl.rho": 0.05, "seed": 0},
              {"model.width": 14, "regularizer.activity_kl.rho": 0.2, "seed": 1}]
    pop = train_population(base, points, tmp_path / "pop", Options(loop_width=loop_width))
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)



@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_activity_penalty_with_a_norm_reads_the_normalized_activations(compose_cfg, tmp_path, norm):
    # with a norm the stacked forward takes its general path, which must record the hidden site
    # (after the norm and activation) as the lone model's Site does
    # (momentum with batch norm: the bias before it has a gradient of pure rounding noise, which
    # Adam's normalised step would turn into lr-sized moves no two summation orders share)
    overrides, points = CASES["activity_l1"]
    opt = "optimizer=adam" if norm == "layer" else "optimizer=momentum"
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [opt, f"model.norm={norm}"] + overrides, points)
    assert incompatibility(base) is None and use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


# uneven hidden widths (each layer padded to the bucket's widest, its own unit mask) and skips
# ([40, 20, 20] on 40 inputs: skips around layers 1 and 3, [32, 16, 16] around layer 3,
# [40, 24, 20] around layer 1), each member with its own α, γ, ρ
UNEVEN = [{"model.widths": [40, 20, 20], "regularizer.activity_l1.alpha": 1e-2, "regularizer.activity_kl.alpha": 5e-2,
           "regularizer.activity_kl.rho": 0.05, "regularizer.activity_student_t.alpha": 1e-2,
           "regularizer.activity_student_t.gamma": 2.0, "seed": 0},
          {"model.widths": [32, 16, 16], "regularizer.activity_l1.alpha": 0.0, "regularizer.activity_kl.alpha": 2e-2,
           "regularizer.activity_kl.rho": 0.2, "regularizer.activity_student_t.alpha": 3e-2,
           "regularizer.activity_student_t.gamma": 0.5, "seed": 1},
          {"model.widths": [40, 24, 20], "regularizer.activity_l1.alpha": 3e-2, "regularizer.activity_kl.alpha": 0.0,
           "regularizer.activity_kl.rho": 0.1, "regularizer.activity_student_t.alpha": 0.0,
           "regularizer.activity_student_t.gamma": 1.0, "seed": 2}]


@pytest.mark.parametrize("overrides", [
    # sigmoid: act(0) = 1/2 is masked per layer, and KL's padded rates (0) kept out by each
    # layer's own mask, whose widths differ from layer to layer and from the widest member's
    ["regularizer=[dropout,activity_l1,activity_kl]", "regularizer.dropout.p=0.1", "model.activation=sigmoid"],
    # the sites sit on each residual branch, before the skip's sum, as in the lone Residual block
    ["regularizer=[activity_student_t,activity_kl]", "model.activation=sigmoid", "model.residual=true"],
    ["regularizer=[dropout,activity_l1]", "regularizer.dropout.p=0.1", "model.residual=true", "model.norm=layer"],
], ids=["uneven", "uneven_residual", "uneven_residual_layer_norm"])
def test_activity_penalties_with_uneven_widths_and_skips_match_lone_runs(compose_cfg, tmp_path, overrides):
    listed = overrides[0][len("regularizer=["):-1].split(",")
    points = [{k: v for k, v in p.items() if not k.startswith("regularizer.") or k.split(".")[1] in listed}
              for p in UNEVEN]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + ["optimizer=momentum"] + overrides, points)
    assert incompatibility(base) is None and use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # includes the penalty/<name> curves
    assert len({a["final"]["train_loss"] for a in pop}) == 3


def test_activity_penalty_with_even_skips_matches_lone_runs(compose_cfg, tmp_path):
    # one width per member, residual: width 40 (the input's) has a skip around every layer, 16
    # around all but the first; relu KL's padded rates are kept out by the masks
    points = [{"model.width": 40, "regularizer.activity_kl.alpha": 5e-2, "regularizer.activity_kl.rho": 0.1, "seed": 0},
              {"model.width": 16, "regularizer.activity_kl.alpha": 1e-2, "regularizer.activity_kl.rho": 0.3,
               "seed": 1}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=momentum", "regularizer=[activity_kl]", "model.residual=true", "model.depth=3"], points)
    assert incompatibility(base) is None and use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
