"""The ``ensemble`` regularizer in a population (regexp/population/ensemble.py): each member's K
models are K stacked slices it owns.

The reference below is written from torch alone: K ``nn.Sequential`` MLPs built from the seeds the
regularizer documents (the run's seed for model 0, ``seed·1000003 + k`` for model k), one
``torch.optim`` optimizer over all of them, the loss Σₖ CEₖ (with bagging, model k's per-example
losses weighted by its bootstrap counts: n draws with replacement from a generator seeded
``seed·1000003 + 7919``), and the ensemble's prediction ln((1/K) Σₖ softmax(zₖ)).

Stated tolerances, as tests/test_population_reference.py and tests/test_population.py state them
(float32; only the summation order inside the batched products differs): against the reference
after 300 steps every parameter within |a - b| <= 1e-5 + 1e-4·|b|, the test loss within a relative
1e-4; a member of a population against its population of one the same for the parameters and a
relative 1e-4 for every metric. A resumed run equals the uninterrupted one exactly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import StopAfter, train_with_and_without
from regexp.data import load_data
from regexp.population import train_population
from regexp.sweep import point_config, point_name

ATOL, RTOL = 1e-5, 1e-4
N_TRAIN, BATCH, EPOCHS = 320, 32, 30  # 10 steps an epoch: 300 steps
RUN = [f"data.n_train={N_TRAIN}", f"trainer.batch_size={BATCH}", "trainer.progress=false", "trainer.threads=1",
       "trainer.device=cpu", "logger.histogram_every=0"]
BASE = RUN + ["model.width=24", "model.depth=2"]


def _plain_mlp(in_dim: int, classes: int, width: int, depth: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def _ensemble_log_prob(nets: List[nn.Module], x: torch.Tensor) -> torch.Tensor:
    lp = torch.stack([F.log_softmax(n(x), 1) for n in nets])
    return torch.logsumexp(lp, 0) - math.log(len(nets))


def reference_run(cfg, transform: Optional[Callable] = None, penalty: Optional[Callable] = None,
                  groups: Optional[Callable] = None,
                  start: Optional[Callable] = None) -> Tuple[List[nn.Module], List[nn.Module], float, float]:
    """(initial models, trained models, test loss, test accuracy) of cfg's ensemble, in plain torch
    (``transform(nets, x, y)``: the step's batch as the K models read it; ``penalty(nets, x, y,
    loss)``: a term added to Σₖ CEₖ; ``groups(nets)``: further optimizer groups, after the models';
    ``start(nets)``: what the models start from instead of their seeds' weights, and what they freeze)."""
    ds = load_data(cfg.data, cfg.seed)
    x, y = ds.split("train")
    x = x.flatten(1)
    xt, yt = ds.split("test")
    xt = xt.flatten(1)
    seed, k_models = int(cfg.seed), int(cfg.regularizer.ensemble.components)
    nets = []
    for k in range(k_models):
        torch.manual_seed(seed if k == 0 else seed * 1_000_003 + k)
        nets.append(_plain_mlp(x.shape[1], ds.num_classes, cfg.model.width, cfg.model.depth))
    if start is not None:
        start(nets)
    init = [_copy(n) for n in nets]
    n, bs = len(y), BATCH
    counts = None
    if cfg.regularizer.ensemble.bootstrap:
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919)
        draws = torch.randint(0, n, (k_models, n), generator=g)
        counts = torch.stack([torch.bincount(d, minlength=n) for d in draws]).float()
    params = [{"params": [p for net in nets for p in net.parameters()]}] + ([] if groups is None else groups(nets))
    o = cfg.optimizer
    rule = o.base if o.name == "sam" else o.name
    opt = (torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps) if rule == "adam"
           else torch.optim.SGD(params, lr=o.lr))
    order = torch.Generator().manual_seed(seed)
    for _ in range(cfg.trainer.epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(-(-n // bs)):
            idx = perm[i * bs:(i + 1) * bs]
            xb = x[idx] if transform is None else transform(nets, x[idx], y[idx])

            def backward(xb=xb, idx=idx) -> None:
                losses = [F.cross_entropy(net(xb), y[idx], reduction="none") for net in nets]
                if counts is None:
                    loss = sum(l.mean() for l in losses)
                else:
                    loss = sum((counts[k, idx] * l).mean() for k, l in enumerate(losses))
                if penalty is not None:
                    loss = loss + penalty(nets, xb, y[idx], loss)
                opt.zero_grad()
                loss.backward()

            backward()
            if o.name == "sam":
                _sam_ascent([p for g in opt.param_groups for p in g["params"]], o, backward)
            opt.step()
    with torch.no_grad():
        lp = _ensemble_log_prob(nets, xt)
        return init, nets, F.cross_entropy(lp, yt).item(), (lp.argmax(1) == yt).float().mean().item()


def _sam_ascent(params: List[torch.Tensor], o, backward: Callable[[], None]) -> None:
    """SAM (ASAM with ``o.adaptive``): the gradient at w + ε̂ into ``.grad``, the weights back at w;
    ε̂ = ρ·T²g/‖Tg‖ over every optimizer group's parameters, T = |w| + η (ASAM) or 1."""
    with torch.no_grad():
        t = [p.abs() + o.eta if o.adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum((ti * p.grad).pow(2).sum() for ti, p in zip(t, params)))
        eps = [o.rho * ti * ti * p.grad / norm for ti, p in zip(t, params)]
        saved = [p.clone() for p in params]
        for p, e in zip(params, eps):
            p.add_(e)
    backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)


def _copy(net: nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _components(state: Dict[str, torch.Tensor], k_models: int) -> List[List[torch.Tensor]]:
    """The Ensemble's state_dict (``members.k.*``) as each model's tensors, in order."""
    return [[t for name, t in state.items() if name.startswith(f"members.{k}.")] for k in range(k_models)]


@pytest.mark.parametrize("overrides", [
    ["optimizer=adam", "optimizer.lr=0.003"],
    ["optimizer=sgd", "optimizer.lr=0.05", "regularizer.ensemble.bootstrap=true"],
], ids=["adam", "sgd-bagging"])
def test_an_ensemble_population_of_one_equals_plain_torch(compose_cfg, tmp_path, overrides):
    base = compose_cfg(BASE + [f"trainer.epochs={EPOCHS}", "regularizer=[ensemble]",
                               "regularizer.ensemble.components=3"] + overrides)
    point = {"seed": 3}
    (metrics,) = train_population(base, [point], tmp_path)
    assert metrics["status"] == "completed" and metrics["engine"] == "population"
    cfg = point_config(base, point)
    init, nets, test_loss, test_acc = reference_run(cfg)
    out = tmp_path / point_name(point)
    # the population starts from the models the seeds build, stored under the Ensemble's names
    started = _components(torch.load(out / "init_model.pt", weights_only=True), 3)
    for a, b in zip(started, init):
        assert len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))
    final = _components(torch.load(out / "model.pt", weights_only=True), 3)
    for k, (a, net) in enumerate(zip(final, nets)):
        for s, p in zip(a, net.parameters()):
            torch.testing.assert_close(s, p.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"model {k}: {m}")
    assert not torch.equal(final[2][0], started[2][0])  # it trained
    assert metrics["final"]["test_loss"] == pytest.approx(test_loss, rel=RTOL)
    assert metrics["final"]["test_acc"] == pytest.approx(test_acc, abs=1e-6)
    # the report is the lone Ensemble module's, on the same weights
    assert metrics["extra"]["ensemble/test_loss"] == pytest.approx(test_loss, rel=RTOL)
    assert metrics["extra"]["ensemble/test_acc"] == pytest.approx(test_acc, abs=1e-6)
    assert ("ensemble/bootstrap_unique_fraction" in metrics["extra"]) == ("bootstrap=true" in str(overrides))


def _members(monkeypatch) -> List[int]:
    """How many members each population the sweep trains has."""
    import regexp.population.run as run

    sizes: List[int] = []
    real = run.train_bucket
    monkeypatch.setattr(run, "train_bucket", lambda ms, *a, **k: (sizes.append(len(ms)), real(ms, *a, **k))[1])
    return sizes


def _assert_same_member(a_dir: Path, b_dir: Path, a: Dict, b: Dict) -> None:
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a_dir, b_dir))
    assert wa.keys() == wb.keys()
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        assert ra == pytest.approx(rb, rel=RTOL, abs=1e-6)
    assert a["extra"] == pytest.approx(b["extra"], rel=RTOL, abs=1e-6)


def test_ensemble_members_of_a_population_equal_their_populations_of_one(compose_cfg, tmp_path, monkeypatch):
    base = compose_cfg(BASE + ["trainer.epochs=3", "regularizer=[ensemble,dropout,weight_decay]",
                               "regularizer.ensemble.components=2", "optimizer=adam", "trainer.grad_clip=1.0"])
    points = [{"seed": 0, "optimizer.lr": 0.003, "regularizer.dropout.p": 0.1, "regularizer.weight_decay.lam": 1e-4,
               "model.width": 24},
              {"seed": 1, "optimizer.lr": 0.001, "regularizer.dropout.p": 0.3, "regularizer.weight_decay.lam": 1e-3,
               "model.width": 16},
              {"seed": 2, "optimizer.lr": 0.002, "regularizer.dropout.p": 0.0, "regularizer.weight_decay.lam": 0.0,
               "model.width": 24}]
    assert_each_equals_alone(base, points, tmp_path, monkeypatch)


def assert_each_equals_alone(base, points, tmp_path: Path, monkeypatch) -> None:
    """Three ensemble runs train as one population, and each ends as it does alone."""
    sizes = _members(monkeypatch)
    pop = train_population(base, points, tmp_path / "pop")
    assert sizes == [3]  # one population of three ensembles
    for p, a in zip(points, pop):
        (b,) = train_population(base, [p], tmp_path / "one")
        assert a["status"] == b["status"] == "completed"
        _assert_same_member(tmp_path / "pop" / point_name(p), tmp_path / "one" / point_name(p), a, b)
    assert sizes == [3, 1, 1, 1]


# Each combination the population trains beside ensemble: two ensembles differing in seed and
# a value (λ, ε, ρ, lr, patience) as one population, each equal to its population of one.
@pytest.mark.parametrize("variant,values", [
    (["regularizer=[ensemble,weight_decay]", "regularizer.ensemble.components=3", "optimizer=adam"],
     ("regularizer.weight_decay.lam", 1e-4, 1e-2)),
    # bagging's weights, each slice's smoothing, and one clipping norm over an owner's slices
    (["regularizer=[ensemble,label_smoothing]", "regularizer.ensemble.bootstrap=true", "optimizer=momentum",
      "trainer.grad_clip=0.5"], ("regularizer.label_smoothing.eps", 0.05, 0.2)),
    # one leaves at epoch 2, the other at 3 (val_loss never improves by 1.0), the other going on without it
    (["regularizer=[ensemble,early_stopping]", "optimizer=sgd", "trainer.epochs=4",
      "regularizer.early_stopping.monitor=val_loss", "regularizer.early_stopping.min_delta=1.0"],
     ("regularizer.early_stopping.patience", 1, 2)),
    # activity penalties: each model's own hidden activations, summed over the K as over the Ensemble's sites
    (["regularizer=[ensemble,activity_l1,activity_student_t]", "optimizer=adam"],
     ("regularizer.activity_l1.alpha", 1e-4, 1e-3)),
    (["regularizer=[ensemble,activity_kl]", "model.activation=sigmoid", "optimizer=adam"],
     ("regularizer.activity_kl.alpha", 1e-3, 1e-2)),
    # SAM's ascent under one norm over the K models, as over the Ensemble's parameters
    (["regularizer=[ensemble]", "optimizer=sam"], ("optimizer.rho", 0.05, 0.2)),
    # every stacked model: its K models as K slices (batch norm's running statistics per model)
    # (GELU: with ReLU, a pre-activation within rounding of 0 takes the kink's other side, and
    # its gradient then differs by lr·gradient, not by rounding: on one thread of the AVX2 EPYC
    # kernel entries differed by 4.1e-4 after 2 epochs with ReLU, within 5e-7 after 4 with GELU
    # or tanh)
    (["regularizer=[ensemble]", "model=cnn_mnist1d", "model.norm=batch", "model.activation=gelu",
      "optimizer=momentum"], ("optimizer.lr", 0.01, 0.05)),
    (["regularizer=[ensemble]", "model=transformer", "model.depth=1", "model.heads=2", "model.mlp_ratio=2.0",
      "model.embed_dim=8", "optimizer=momentum"], ("optimizer.lr", 0.01, 0.05)),
    (["regularizer=[ensemble]", "model=gru", "optimizer=adam"], ("optimizer.lr", 0.001, 0.003)),
], ids=["adam-decay", "bagging-smoothing-clip", "early-stopping", "activity-l1-student-t", "activity-kl", "sam",
        "cnn-batch-norm", "transformer", "gru"])
def test_ensemble_members_of_every_combination_equal_each_alone(compose_cfg, tmp_path, monkeypatch, variant, values):
    mlp = [] if any(v.startswith("model=") for v in variant) else ["model.width=16", "model.depth=2"]
    k = [] if any("components" in v for v in variant) else ["regularizer.ensemble.components=2"]
    epochs = [] if any("epochs" in v for v in variant) else ["trainer.epochs=2"]
    base = compose_cfg(RUN + mlp + k + epochs + variant)
    key, a, b = values
    points = [{"seed": 0, key: a}, {"seed": 1, key: b}]
    sizes = _members(monkeypatch)
    pop = train_population(base, points, tmp_path / "pop")
    assert sizes == [2]  # one population of both
    for p, run in zip(points, pop):
        (alone,) = train_population(base, [p], tmp_path / "one")
        assert run["status"] == alone["status"] == "completed"
        assert run.get("stopped_epoch") == alone.get("stopped_epoch")
        assert any(name.startswith("ensemble/") for name in run["extra"])  # the lone Ensemble's report
        _assert_same_member(tmp_path / "pop" / point_name(p), tmp_path / "one" / point_name(p), run, alone)
    if key.endswith("patience"):
        assert [run.get("stopped_epoch") for run in pop] == [2, 3]


def test_ensembles_with_weight_draws_equal_their_populations_of_one(compose_cfg, tmp_path, monkeypatch):
    # weight noise and DropConnect on every model's weights, each member drawing from its own generator
    base = compose_cfg(BASE + ["trainer.epochs=2", "regularizer=[ensemble,weight_noise,dropconnect]",
                               "regularizer.ensemble.components=2", "optimizer=momentum"])
    points = [{"seed": 0, "regularizer.weight_noise.sigma": 0.01, "regularizer.dropconnect.p": 0.1},
              {"seed": 1, "regularizer.weight_noise.sigma": 0.05, "regularizer.dropconnect.p": 0.2, "model.width": 16}]
    sizes = _members(monkeypatch)
    pop = train_population(base, points, tmp_path / "pop")
    for p, a in zip(points, pop):
        (b,) = train_population(base, [p], tmp_path / "one")
        _assert_same_member(tmp_path / "pop" / point_name(p), tmp_path / "one" / point_name(p), a, b)
    assert sizes == [2, 1, 1]
    assert pop[0]["final"]["train_loss"] != pop[1]["final"]["train_loss"]
    # the draws reach the weights: without them the same member ends elsewhere
    quiet = dict(points[0], **{"regularizer.weight_noise.sigma": 0.0, "regularizer.dropconnect.p": 0.0})
    train_population(base, [quiet], tmp_path / "quiet")
    w0, w1 = (torch.load(d / "model.pt", weights_only=True) for d in (tmp_path / "pop" / point_name(points[0]),
                                                                      tmp_path / "quiet" / point_name(quiet)))
    assert all(not torch.allclose(w0[k], w1[k], atol=1e-3) for k in w0 if k.endswith("weight"))


def test_an_ensembles_models_read_one_noisy_augmented_batch(compose_cfg, tmp_path, monkeypatch):
    # as a lone Ensemble's K models read the one batch input_noise and augmentation transformed;
    # each member with its own σ, shift and scale equals its population of one
    from regexp.population.stacked_mlp import StackedMLP

    base = compose_cfg(BASE + ["trainer.epochs=2", "regularizer=[ensemble,augmentation,input_noise]",
                               "regularizer.ensemble.components=3", "optimizer=adam"])
    points = [{"seed": 0, "regularizer.input_noise.sigma": 0.1, "regularizer.augmentation.shift": 2},
              {"seed": 1, "regularizer.input_noise.sigma": 0.3, "regularizer.augmentation.scale": 0.1}]
    inputs: List[torch.Tensor] = []
    for method in ("forward", "manual_step"):  # autograd's step or the hand-written one
        real = getattr(StackedMLP, method)
        monkeypatch.setattr(StackedMLP, method,
                            lambda self, x, *a, real=real, **k: (inputs.append(x), real(self, x, *a, **k))[1])
    pop = train_population(base, points, tmp_path / "pop")
    monkeypatch.undo()
    x = inputs[-1].view(2, 3, *inputs[-1].shape[1:])  # the last step's (members, models, batch, features)
    assert all(torch.equal(x[:, 0], x[:, k]) for k in (1, 2)) and not torch.equal(x[0, 0], x[1, 0])
    clean = load_data(base.data, 0).split("train")[0].flatten(1)
    assert not any(torch.equal(x[0, 0, 0], row) for row in clean)  # transformed
    for p, a in zip(points, pop):
        (b,) = train_population(base, [p], tmp_path / "one")
        _assert_same_member(tmp_path / "pop" / point_name(p), tmp_path / "one" / point_name(p), a, b)


def test_an_interrupted_ensemble_population_resumes_exactly(compose_cfg, tmp_path, monkeypatch):
    base = compose_cfg(BASE + ["trainer.epochs=3", "regularizer=[ensemble,input_noise,dropout,weight_noise]",
                               "regularizer.ensemble.components=2", "regularizer.ensemble.bootstrap=true",
                               "optimizer=momentum", "trainer.grad_clip=1.0"])
    points = [{"seed": 0, "regularizer.dropout.p": 0.2}, {"seed": 1, "regularizer.dropout.p": 0.1}]
    assert_resumes_exactly(base, points, tmp_path, monkeypatch)


def assert_resumes_exactly(base, points, tmp_path: Path, monkeypatch) -> None:
    """Ensemble runs (two models each) stopped in the middle of epoch 2 and resumed end as the
    uninterrupted ones, bit for bit (weights, records, reports)."""
    import regexp.population.engine as engine

    whole = train_population(base, points, tmp_path / "whole")
    steps = -(-len(load_data(base.data, 0).y_train) // BATCH)
    # the loop asks once per step and once after each epoch's end: stop in the middle of epoch 2
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(steps + steps // 2))
    stopped = train_population(base, points, tmp_path / "cut")
    monkeypatch.undo()
    for p, m in zip(points, stopped):
        assert m["status"] == "interrupted" and m["epochs"] == 1
        ck = torch.load(tmp_path / "cut" / point_name(p) / "checkpoint.pt", weights_only=True)
        assert (ck["epoch"], ck["step_in_epoch"]) == (1, steps // 2)
        assert {k.split(".")[1] for k in ck["model"]} == {"0", "1"}  # the Ensemble's names
    resumed = train_population(base, points, tmp_path / "cut")
    for p, a, b in zip(points, resumed, whole):
        assert a["status"] == b["status"] == "completed"
        wa, wb = (torch.load(d / point_name(p) / "model.pt", weights_only=True) for d in (tmp_path / "cut",
                                                                                            tmp_path / "whole"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb)
        assert a["history"] == b["history"] and a["extra"] == b["extra"]


@pytest.mark.parametrize("case", ["diverged", "stopped"])
def test_an_ensemble_leaving_early_changes_nothing_for_the_others(compose_cfg, tmp_path, case):
    # its slices leave the stacked state (and the clipping groups, bagging's counts) mid-run:
    # the others end bit-equal (atol=0) to a population without it
    base = compose_cfg(BASE + ["trainer.epochs=4", "regularizer=[ensemble,early_stopping]",
                               "regularizer.ensemble.components=2", "regularizer.ensemble.bootstrap=true",
                               "regularizer.early_stopping.patience=100", "optimizer=momentum", "optimizer.lr=0.05",
                               "trainer.grad_clip=1.0"])
    others = [{"seed": 0}, {"seed": 1, "optimizer.lr": 0.02}]
    leaver = ({"seed": 2, "optimizer.lr": 1e6, "trainer.grad_clip": None} if case == "diverged" else
              {"seed": 2, "regularizer.early_stopping.patience": 1, "regularizer.early_stopping.monitor": "val_loss",
               "regularizer.early_stopping.min_delta": 10.0})
    with_it, without = train_with_and_without(base, others, leaver, tmp_path, case)
    if case == "stopped":
        assert torch.load(tmp_path / "with" / point_name(leaver) / "model.pt", weights_only=True).keys() == \
            torch.load(tmp_path / "without" / point_name(others[0]) / "model.pt", weights_only=True).keys()
    for p, a, b in zip(others, [with_it[0], with_it[2]], without):
        assert a["status"] == b["status"] == "completed"
        assert a["history"] == b["history"] and a["extra"] == b["extra"]
        wa, wb = (torch.load(d / point_name(p) / "model.pt", weights_only=True) for d in (tmp_path / "with",
                                                                                            tmp_path / "without"))
        assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_the_lone_ensemble_module_loads_a_members_weights(compose_cfg, tmp_path):
    from regexp.models import build_model
    from regexp.regularizers.ensemble import Ensemble

    base = compose_cfg(BASE + ["trainer.epochs=1", "regularizer=[ensemble]", "regularizer.ensemble.components=3"])
    (m,) = train_population(base, [{"seed": 5}], tmp_path)
    ds = load_data(base.data, 5)
    lone = Ensemble([build_model(base.model, ds.input_shape, ds.num_classes) for _ in range(3)])
    lone.load_state_dict(torch.load(tmp_path / point_name({"seed": 5}) / "model.pt", weights_only=True))
    x, y = ds.split("test")
    with torch.no_grad():
        loss = F.cross_entropy(lone.eval()(x), y).item()
    assert loss == pytest.approx(m["final"]["test_loss"], rel=1e-5)
