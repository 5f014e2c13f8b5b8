"""The population engine's choice and its shared pieces: why ``sweep.engine=auto`` trains
serially (logged, recorded), the best epoch ranked by the trainer's own function, and
AdaGrad / RMSprop / AdaDelta and ``trainer.grad_clip`` per member.

Stated tolerances (float32): a member trained in a population ends within
|a - b| <= 1e-5 + 1e-4·|b| of its lone ``train()`` run (2 epochs; only the summation order
inside the batched products differs); a population of one, and each member of a population
with per-member hyperparameters, ends within 1e-4 + 1e-3·|b| of a plain ``torch.nn`` +
``torch.optim`` reference after 200 steps (the adaptive rules divide by a running root mean
square, which amplifies the last-bit differences of the batched products).
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.population import use_population
from regexp.population.compat import shared_part
from regexp.population.engine import clip_grad_norms_
from regexp.population.member import Member
from regexp.population.optim import StackedOptimizer
from regexp.population.run import choose_engine
from regexp.population.stacked_mlp import StackedMLP
from regexp.train.records import best_score, improves
from test_population import _assert_same_run, _pop_and_lone

SMALL = ["data.n_train=300", "trainer.batch_size=50"]


# ---------------------------------------------------------------- auto never falls back silently
def test_auto_serial_logs_why_once_and_the_sweep_records_it(compose_cfg, caplog):
    from regexp.experiments.sweep_task import _engine

    from regexp.population.compat import incompatibility

    cfg = compose_cfg(["task=sweep", "regularizer=[ensemble,multi_task]"])
    points = [{"optimizer.lr": lr, "seed": s} for lr in (0.05, 0.1) for s in (0, 1)]
    caplog.set_level(logging.INFO, logger="regexp.population")
    assert not use_population(cfg, points)
    why = incompatibility(cfg)
    assert why.startswith("regularizer multi_task with ensemble (")
    lines = [r.getMessage() for r in caplog.records if r.name == "regexp.population"]
    assert lines == ["sweep.engine=auto trains the points serially, one run at a time: " + why]
    # what the sweep's metrics.json records beside its counts
    assert _engine(cfg, points) == {"engine": "serial", "engine_reason": why}
    assert _engine(compose_cfg(["task=sweep"]), points) == {"engine": "population"}


def test_engine_choice_names_its_reason(compose_cfg, caplog, monkeypatch):
    from regexp.population import compat

    points = [{"model.width": 8, "seed": 0}]
    assert choose_engine(compose_cfg(), points) == ("population", None)
    assert choose_engine(compose_cfg(["sweep.engine=serial"]), points) == ("serial", "sweep.engine=serial")
    assert choose_engine(compose_cfg(["regularizer=[ensemble]"]), points) == ("population", None)
    assert choose_engine(compose_cfg(["regularizer=[ensemble,soft_weight_sharing]"]), points) == ("population", None)
    assert choose_engine(compose_cfg(["regularizer=[ensemble,soft_weight_sharing]", "optimizer=sam"]),
                         points) == ("population", None)
    assert choose_engine(compose_cfg(["regularizer=[ensemble,parameter_tying]", "regularizer.parameter_tying.mode=joint"]),
                         points)[1].startswith("regularizer parameter_tying.mode=joint with ensemble (")
    # a loss term listed as supported but without a stacked form is refused, never trained as zero
    monkeypatch.setattr(compat.ALL["l1"], "penalty_of", None)
    monkeypatch.setattr(compat.ALL["l1"], "penalizes", classmethod(lambda cls: True))
    assert choose_engine(compose_cfg(["regularizer=[l1]"]), points) == (
        "serial", "regularizer l1 (its penalty has no penalty_of for stacked weights)")
    caplog.set_level(logging.INFO, logger="regexp.population")
    assert not use_population(compose_cfg(["sweep.engine=serial"]), points)  # asked for: no line
    assert not [r for r in caplog.records if r.name == "regexp.population"]


# ---------------------------------------------------------------- the best epoch, one function
def test_population_ranks_the_best_epoch_by_the_regularizers_metric(compose_cfg, tmp_path):
    m = Member({}, compose_cfg(), tmp_path, [])
    m.best = {"epoch": 1, "val_acc": 0.50, "val_loss": 1.0}
    row = {"epoch": 2, "val_acc": 0.60, "val_loss": 1.2}  # more accurate, higher loss
    assert m.improves(row)  # by val_acc, the default
    m.regs = [SimpleNamespace(selects_best_by="val_loss")]  # early stopping on val_loss
    assert not m.improves(row)
    assert m.improves({"epoch": 3, "val_acc": 0.40, "val_loss": 0.9})
    score = best_score(m.regs)  # the trainer's ranking is this same function
    assert improves({"epoch": 3, "val_acc": 0.40, "val_loss": 0.9}, m.best, score)
    assert not improves({"epoch": 4, "train_acc": 1.0}, None, score)  # no validation split


# ---------------------------------------------------------------- optimizers and grad_clip per member
CASES = {
    # per-member lr and accumulator start; member 0 clips hard, member 1 never reaches its norm
    "adagrad": (["optimizer=adagrad", "trainer.grad_clip=1.0"],
                [{"model.width": 16, "optimizer.lr": 0.05, "optimizer.initial_accumulator_value": 0.0,
                  "trainer.grad_clip": 0.05, "seed": 0},
                 {"model.width": 12, "optimizer.lr": 0.02, "optimizer.initial_accumulator_value": 0.1,
                  "trainer.grad_clip": 100.0, "seed": 1}]),
    "rmsprop": (["optimizer=rmsprop", "optimizer.centered=true"],
                [{"model.width": 16, "optimizer.lr": 0.003, "optimizer.alpha": 0.9, "optimizer.momentum": 0.5,
                  "seed": 0},
                 {"model.width": 12, "optimizer.lr": 0.001, "optimizer.alpha": 0.99, "optimizer.momentum": 0.0,
                  "seed": 1}]),
    "adadelta": (["optimizer=adadelta", "trainer.grad_clip=0.1", "model.activation=tanh"],  # autograd step
                 [{"model.width": 16, "optimizer.rho": 0.9, "seed": 0},
                  {"model.width": 12, "optimizer.rho": 0.95, "seed": 1}]),
    # ASAM: each member's radius and the η its ball is scaled by (|w| + η)
    "asam": (["optimizer=sam", "optimizer.base=momentum", "optimizer.adaptive=true"],
             [{"model.width": 16, "optimizer.rho": 0.5, "optimizer.eta": 0.01, "seed": 0},
              {"model.width": 12, "optimizer.rho": 0.2, "optimizer.eta": 0.1, "seed": 1}]),
    # each member's own schedule values (one scheduler kind): per-member lr factors, with Adam
    # and the decoupled decay that reads the scheduled lr; with RMSprop's warm restarts
    "step_schedules": (["optimizer=adam", "scheduler=step", "regularizer=[decoupled_weight_decay]",
                        "regularizer.decoupled_weight_decay.lam=0.01"],
                       [{"model.width": 16, "scheduler.gamma": 0.5, "scheduler.step_size": 3, "seed": 0},
                        {"model.width": 12, "scheduler.gamma": 0.9, "scheduler.step_size": 5, "seed": 1}]),
    "warmup_schedules": (["optimizer=momentum", "scheduler=warmup_cosine"],
                         [{"model.width": 16, "scheduler.warmup_steps": 2, "scheduler.min_lr_ratio": 0.0, "seed": 0},
                          {"model.width": 12, "scheduler.warmup_steps": 6, "scheduler.min_lr_ratio": 0.2, "seed": 1}]),
    "restart_schedules": (["optimizer=rmsprop", "scheduler=cosine_restarts"],
                          [{"model.width": 16, "scheduler.period": 3, "scheduler.period_mult": 1.0, "seed": 0},
                           {"model.width": 12, "scheduler.period": 4, "scheduler.period_mult": 2.0, "seed": 1}]),
    # member 0 stops after its second epoch: member 1 goes on with its own schedule, not member 0's
    "schedules_and_early_stop": (["optimizer=sgd", "scheduler=step", "regularizer=[early_stopping]",
                                  "regularizer.early_stopping.patience=1", "trainer.epochs=5"],
                                 [{"model.width": 16, "scheduler.gamma": 0.3, "scheduler.step_size": 2,
                                   "regularizer.early_stopping.min_delta": 10.0, "seed": 0},
                                  {"model.width": 12, "scheduler.gamma": 0.8, "scheduler.step_size": 4,
                                   "regularizer.early_stopping.patience": 10, "seed": 1}]),
    # every hyperparameter shared: torch's own fused kernel on the stacked tensors (the
    # 300-step tests below run the shared RMSprop and AdaDelta steps)
    "adagrad_shared": (["optimizer=adagrad"], [{"model.width": 16, "seed": 0}, {"model.width": 12, "seed": 1}]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adaptive_optimizers_and_grad_clip_per_member_match_lone_runs(compose_cfg, tmp_path, case):
    overrides, points = CASES[case]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + ["sweep.engine=population"] + overrides,
                                    points)
    assert use_population(base, points)
    assert shared_part(points[0]) == shared_part(points[1])  # one population, not one per value
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    if case == "schedules_and_early_stop":
        assert [r["epochs"] for r in pop] == [2, 5]


def _reference_step(model, opt, x, y, clip):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


STEPS = 200
TORCH = {  # name -> (torch.optim class, keyword per member)
    "adagrad": (torch.optim.Adagrad, [dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-10),
                                      dict(lr=0.02, initial_accumulator_value=0.0, eps=1e-10)]),
    "rmsprop": (torch.optim.RMSprop, [dict(lr=0.003, alpha=0.9, eps=1e-8, momentum=0.5, centered=True),
                                      dict(lr=0.001, alpha=0.99, eps=1e-8, momentum=0.0, centered=True)]),
    "adadelta": (torch.optim.Adadelta, [dict(lr=1.0, rho=0.9, eps=1e-6), dict(lr=0.5, rho=0.95, eps=1e-6)]),
}


@pytest.mark.parametrize("name", list(TORCH))
@pytest.mark.parametrize("members", [1, 2])  # 1: shared values (torch's own kernels); 2: per member
def test_population_equals_torch_nn_and_optim_for_200_steps(name, members):
    cls, kws = TORCH[name]
    kws, clips, widths = kws[:members], [0.3, None][:members], [12, 7][:members]
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    models = [nn.Sequential(nn.Linear(10, w), nn.ReLU(), nn.Linear(w, 4)) for w in widths]
    net = StackedMLP(models, widths, max(widths), "relu", torch.device("cpu"))
    hp = {k: [kw[k] for kw in kws] for k in kws[0] if k != "centered"}
    opt = StackedOptimizer(name, net.params, hp, False, torch.device("cpu"), kws[0].get("centered", False))
    refs = [cls(m.parameters(), **kw) for m, kw in zip(models, kws)]
    max_norm = torch.tensor([c if c is not None else float("inf") for c in clips])
    clipped = 0
    for step in range(STEPS):
        idx = torch.arange(step * 16, step * 16 + 16) % 64
        xb, yb = x[idx], y[idx]
        for m, o, c in zip(models, refs, clips):
            _reference_step(m, o, xb, yb, c)
        for p in net.params:
            p.grad = None
        logits = net.forward(xb.expand(len(models), -1, -1))
        F.cross_entropy(logits.reshape(-1, 4), yb.repeat(len(models)), reduction="sum").div(16).backward()
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([p.grad[0].norm() for p in net.params]))
        clipped += int(norm > clips[0])
        clip_grad_norms_(net.params, max_norm)
        opt.step(1.0)
    assert clipped > 0  # the clip acted
    for k, m in enumerate(models):
        lin = [mod for mod in m if isinstance(mod, nn.Linear)]
        w = widths[k]
        ours = [net.weights[0][k, :w], net.biases[0][k, 0, :w], net.weights[1][k, :, :w], net.biases[1][k, 0]]
        for a, b in zip(ours, [lin[0].weight, lin[0].bias, lin[1].weight, lin[1].bias]):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-4, rtol=1e-3)
        assert not torch.equal(lin[0].weight, models[k][0].weight.new_zeros(1))
    if members == 2:  # padding stays exactly zero under every rule
        assert torch.count_nonzero(net.weights[0][1, widths[1]:]) == 0
        assert torch.count_nonzero(net.weights[1][1, :, widths[1]:]) == 0


# ---------------------------------------------------------------- penalties written once
def test_penalty_of_stacked_weights_is_each_members_penalty_values_and_gradients():
    from regexp.regularizers.base import REGULARIZERS

    torch.manual_seed(0)
    stacked = [torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 1, 4, requires_grad=True)]
    lam, lam1, lam2 = torch.tensor([0.1, 0.0, 0.3]), torch.tensor([0.2, 0.5, 0.0]), torch.tensor([0.4, 0.1, 0.7])
    cases = {  # name -> (hp, hand-written Ω of member m, its gradient dΩ/dw)
        "l1": (SimpleNamespace(lam=lam), lambda m, ws: lam[m] * sum(w.abs().sum() for w in ws),
               lambda m, w: lam[m] * w.sign()),
        "elastic_net": (SimpleNamespace(lam1=lam1, lam2=lam2),
                        lambda m, ws: sum(lam1[m] * w.abs().sum() + lam2[m] / 2 * (w * w).sum() for w in ws),
                        lambda m, w: lam1[m] * w.sign() + lam2[m] * w),
        "weight_decay": (SimpleNamespace(lam=lam), lambda m, ws: lam[m] / 2 * sum((w * w).sum() for w in ws),
                         lambda m, w: lam[m] * w),
    }
    for name, (hp, omega, grad) in cases.items():
        pen = REGULARIZERS[name].penalty_of(stacked, hp, True)
        assert pen.shape == (3,)
        for m in range(3):
            ws = [p.detach()[m] for p in stacked]
            assert pen[m].item() == pytest.approx(omega(m, ws).item(), rel=1e-6)
        for p in stacked:
            p.grad = None
        pen.sum().backward()  # members are independent: the sum's gradient is each one's own
        for p in stacked:
            for m in range(3):
                torch.testing.assert_close(p.grad[m], grad(m, p.detach()[m]), rtol=1e-6, atol=1e-7)


def test_l1_and_elastic_net_per_member_match_lone_runs(compose_cfg, tmp_path):
    points = [{"model.width": 16, "regularizer.l1.lam": 1e-3, "regularizer.elastic_net.lam1": 0.0,
               "regularizer.elastic_net.lam2": 1e-2, "seed": 0},
              {"model.width": 12, "regularizer.l1.lam": 0.0, "regularizer.elastic_net.lam1": 2e-3,
               "regularizer.elastic_net.lam2": 0.0, "seed": 1}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + ["optimizer=adam", "regularizer=[l1,elastic_net]"],
                                    points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert pop[0]["history"] != pop[1]["history"]


def test_decoupled_weight_decay_per_member_matches_lone_runs(compose_cfg, tmp_path):
    # the shrink (1 - ηλ) with each member's scheduled η and own λ, biases decayed too
    points = [{"model.width": 16, "optimizer.lr": 0.01, "regularizer.decoupled_weight_decay.lam": 0.5, "seed": 0},
              {"model.width": 12, "optimizer.lr": 0.003, "regularizer.decoupled_weight_decay.lam": 0.05, "seed": 1}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=adam", "scheduler=cosine", "regularizer=[decoupled_weight_decay]",
        "regularizer.decoupled_weight_decay.exclude_bias_and_norm=false"], points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # includes the decoupled_weight_decay/shrink curve
