"""``multi_task`` in the population engine: each member's auxiliary head, stacked, trained by
the members' own update rule on its own training rows' targets.

Stated tolerances (float32): the stacked term within 1e-6 relative of the lone one on the same
features (values and gradients); a member after 2 epochs within |a - b| <= 1e-5 + 1e-4·|b| of
its lone ``train()`` run (weights, history, ``extra``'s validation R², the
``penalty/multi_task`` curve), and after an interruption and resume as well.
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from conftest import StopAfter
from regexp.population import train_population, use_population
from regexp.population.compat import incompatibility
from regexp.regularizers.multi_task import aux_term
from regexp.sweep import point_config, point_name
from regexp.train.trainer import train
from test_population import ATOL, BASE, RTOL, _assert_same_run, _pop_and_lone

SMALL = ["data.n_train=300", "trainer.batch_size=50", "regularizer=[multi_task]",
         "regularizer.multi_task.targets=[shift,scale]"]
# widths of one bucket, λ (0: the head trains on nothing), seeds (each its own split and order)
POINTS = [{"model.width": 16, "regularizer.multi_task.lam": 1.0, "seed": 0},
          {"model.width": 12, "regularizer.multi_task.lam": 0.3, "seed": 1},
          {"model.width": 8, "regularizer.multi_task.lam": 0.0, "seed": 2}]


def test_stacked_term_is_each_members_lone_term_values_and_gradients():
    torch.manual_seed(0)
    widths, width, t, batch = [5, 3], 5, 2, 6
    w = torch.randn(2, t, width)
    w[1, :, 3:] = 0.0  # padded units' columns, as the population holds them
    c, z = torch.randn(2, 1, t), torch.randn(2, batch, t)
    feats = torch.randn(2, batch, width)
    feats[1, :, 3:] = 0.0
    w.requires_grad_(), c.requires_grad_(), feats.requires_grad_()
    lam = torch.tensor([0.7, 2.0])
    term = aux_term(w, c, feats, z, lam, True)
    assert term.shape == (2,)
    term.sum().backward()
    for m, k in enumerate(widths):
        own = [w.detach()[m, :, :k].clone().requires_grad_(), c.detach()[m, 0].clone().requires_grad_(),
               feats.detach()[m, :, :k].clone().requires_grad_()]
        lone = aux_term(own[0], own[1], own[2], z[m], float(lam[m]), False)
        torch.testing.assert_close(term[m], lone.detach(), rtol=1e-6, atol=0)
        gw, gc, gf = torch.autograd.grad(lone, own)
        torch.testing.assert_close(w.grad[m, :, :k], gw, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(c.grad[m, 0], gc, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(feats.grad[m, :, :k], gf, rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(w.grad[1, :, 3:]) == 0  # zero features: the padding stays zero


@pytest.mark.parametrize("overrides", [["optimizer=adam"],
                                       ["optimizer=momentum", "regularizer=[dropout,multi_task]",
                                        "regularizer.dropout.p=0.2", "scheduler=cosine",
                                        "+extra.population.loop_width=1"],  # member by member
                                       ["optimizer=sam", "optimizer.base=momentum", "optimizer.lr=0.05",
                                        "optimizer.rho=0.2", "regularizer=[dropout,multi_task]",
                                        "regularizer.dropout.p=0.1"],
                                       ["optimizer=sam", "optimizer.base=adam", "optimizer.lr=0.01",
                                        "optimizer.adaptive=true", "optimizer.rho=0.5"]])
def test_multi_task_per_member_matches_lone_runs(compose_cfg, tmp_path, overrides):
    # dropout: the head reads the last hidden layer after its mask, and the masks are drawn
    # after the head's initialization, as in a lone run. SAM (and ASAM): the lone optimizer's
    # groups are the model's and the head's, so the ascent moves the head too, under one norm
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + overrides, POINTS)
    assert incompatibility(base) is None and use_population(base, POINTS)
    for p, a, b in zip(POINTS, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # weights, history, extra (val R²), penalty curve
        assert set(a["extra"]) == {"multi_task/val_r2_shift", "multi_task/val_r2_scale"}
        ca, cb = (torch.load(tmp_path / d / point_name(p) / "checkpoint.pt", weights_only=True)
                  for d in ("pop", "lone"))
        for k in ("weight", "bias"):  # the head itself
            torch.testing.assert_close(ca["regularizers"][-1]["aux"][k], cb["regularizers"][-1]["aux"][k],
                                       atol=ATOL, rtol=RTOL)
        # its optimizer state: the lone optimizer's second parameter group, the same layout
        assert [len(g["params"]) for g in ca["optimizer"]["param_groups"]] == \
               [len(g["params"]) for g in cb["optimizer"]["param_groups"]]
        assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
        for i, st in cb["optimizer"]["state"].items():
            for key, v in st.items():
                torch.testing.assert_close(ca["optimizer"]["state"][i][key], v, atol=ATOL, rtol=RTOL)
    assert pop[0]["extra"] != pop[1]["extra"]


def test_interrupted_multi_task_population_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path,
                                                                               monkeypatch):
    import regexp.population.engine as engine

    base = compose_cfg(BASE + SMALL + ["optimizer=adam", "trainer.epochs=3"])
    points = POINTS[:2]
    steps = math.ceil(300 / 50)
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(steps + steps // 2 + 1))  # mid epoch 2
    stopped = train_population(base, points, tmp_path / "pop")
    monkeypatch.undo()
    assert [m["status"] for m in stopped] == ["interrupted"] * 2
    # the checkpoint is train()'s: a lone run goes on from it as well (head and its Adam state)
    shutil.copytree(tmp_path / "pop" / point_name(points[0]), tmp_path / "handover")
    handed = train(point_config(base, points[0]), tmp_path / "handover", [], sweep=True)
    resumed = train_population(base, points, tmp_path / "pop")
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, resumed, lone):
        assert a["epochs"] == 3
        _assert_same_run(tmp_path, p, a, b)
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (tmp_path / "handover", tmp_path / "lone" / point_name(points[0])))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL)
    for k in lone[0]["extra"]:
        assert handed["extra"][k] == pytest.approx(lone[0]["extra"][k], rel=RTOL, abs=1e-6)

# uneven hidden widths: the head reads the last layer, padded to that layer's widest (20, not
# the bucket's 40); with skips ([40, 20, 20]: around layers 1 and 3) it reads the last layer's
# output after the skip's sum, not the site on its branch
UNEVEN = [{"model.widths": [40, 20, 20], "regularizer.multi_task.lam": 1.0, "seed": 0},
          {"model.widths": [32, 16, 16], "regularizer.multi_task.lam": 0.3, "seed": 1},
          {"model.widths": [40, 24, 20], "regularizer.multi_task.lam": 0.0, "seed": 2}]


@pytest.mark.parametrize("overrides,points", [
    (["optimizer=momentum", "regularizer=[dropout,multi_task]", "regularizer.dropout.p=0.1"], UNEVEN),
    (["optimizer=momentum", "model.residual=true"], UNEVEN),
    (["optimizer=adam", "model.residual=true", "model.norm=layer", "model.depth=2"],
     [{"model.width": 40, "regularizer.multi_task.lam": 1.0, "seed": 0},  # a skip around both layers
      {"model.width": 16, "regularizer.multi_task.lam": 0.5, "seed": 1}]),  # around the second only
], ids=["uneven", "uneven_residual", "residual"])
def test_multi_task_with_uneven_widths_and_skips_matches_lone_runs(compose_cfg, tmp_path, overrides, points):
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + overrides, points)
    assert incompatibility(base) is None and use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # weights, history, extra (val R²), penalty curve
        ca, cb = (torch.load(tmp_path / d / point_name(p) / "checkpoint.pt", weights_only=True)
                  for d in ("pop", "lone"))
        for k in ("weight", "bias"):  # the head itself
            torch.testing.assert_close(ca["regularizers"][-1]["aux"][k], cb["regularizers"][-1]["aux"][k],
                                       atol=ATOL, rtol=RTOL)


def _same_groups(tmp_path, p, regs) -> None:
    """Each regularizer's own state (the head, the mixture) and every optimizer group's state
    (weights, then the regularizers' groups in config order) as the lone run's."""
    ca, cb = (torch.load(tmp_path / d / point_name(p) / "checkpoint.pt", weights_only=True) for d in ("pop", "lone"))
    for i, r in enumerate(regs):
        key = "aux" if r == "multi_task" else "mixture"
        for k, v in cb["regularizers"][i][key].items():
            torch.testing.assert_close(ca["regularizers"][i][key][k], v, atol=ATOL, rtol=RTOL)
    assert [(len(g["params"]), g["lr"]) for g in ca["optimizer"]["param_groups"]] == pytest.approx(
        [(len(g["params"]), g["lr"]) for g in cb["optimizer"]["param_groups"]])
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
    for i, st in cb["optimizer"]["state"].items():
        assert ca["optimizer"]["state"][i].keys() == st.keys()
        for key, v in st.items():
            torch.testing.assert_close(ca["optimizer"]["state"][i][key], v, atol=ATOL, rtol=RTOL)


# each member's head and mixture: its own λ, τ, mixture lr; the two extra groups stepped together
BOTH = [{"model.width": 16, "regularizer.multi_task.lam": 1.0, "regularizer.soft_weight_sharing.tau": 0.01,
         "regularizer.soft_weight_sharing.lr": 0.01, "seed": 0},
        {"model.width": 12, "regularizer.multi_task.lam": 0.3, "regularizer.soft_weight_sharing.tau": 0.002,
         "regularizer.soft_weight_sharing.lr": 0.003, "seed": 1}]


@pytest.mark.parametrize("regs", [["multi_task", "soft_weight_sharing"], ["soft_weight_sharing", "multi_task"]])
def test_multi_task_with_soft_weight_sharing_matches_lone_runs(compose_cfg, tmp_path, regs):
    # Adam's state in each group and the cosine schedule on each group's own lr; the groups'
    # order in the checkpoint is the config's, as train() appends them
    overrides = [f"regularizer=[{','.join(regs)}]", "regularizer.soft_weight_sharing.components=4",
                 "optimizer=adam", "scheduler=cosine"]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + overrides, BOTH)
    assert incompatibility(base) is None and use_population(base, BOTH)
    for p, a, b in zip(BOTH, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # weights, history, both penalty curves, extra (R², mixture)
        _same_groups(tmp_path, p, regs)
    assert {"multi_task/val_r2_shift", "soft_weight_sharing/mu_1"} <= set(pop[0]["extra"])


def test_interrupted_population_with_head_and_mixture_resumes_to_the_lone_result(compose_cfg, tmp_path, monkeypatch):
    # the mixture's group listed first: its Adam state comes back from the entries after the
    # weights', the head's after the mixture's
    from test_population_stop_transfer import _interrupt_resume_and_lone

    regs = ["soft_weight_sharing", "multi_task"]
    overrides = SMALL[:1] + SMALL[2:] + [f"regularizer=[{','.join(regs)}]",
                                         "regularizer.soft_weight_sharing.components=4", "optimizer=adam",
                                         "trainer.epochs=3"]
    _, resumed, lone = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, overrides, BOTH, 1)
    for p, a, b in zip(BOTH, resumed, lone):
        for k in b["extra"]:
            assert a["extra"][k] == pytest.approx(b["extra"][k], rel=RTOL, abs=1e-6), k
        _same_groups(tmp_path, p, regs)


# logistic regression: no hidden layer, so the head reads what the output layer reads, the
# input after its dropout mask (the lone model's input site); each member its own λ and seed
DEPTH0 = [{"regularizer.multi_task.lam": 1.0, "regularizer.dropout.input_p": 0.2, "seed": 0},
          {"regularizer.multi_task.lam": 0.3, "regularizer.dropout.input_p": 0.0, "seed": 1}]


@pytest.mark.parametrize("overrides", [["optimizer=adam"],
                                       ["optimizer=momentum", "+extra.population.loop_width=1"]],
                         ids=["batched", "member_by_member"])
def test_multi_task_without_hidden_layer_matches_lone_runs(compose_cfg, tmp_path, overrides):
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + overrides + [
        "model.depth=0", "regularizer=[dropout,multi_task]", "regularizer.dropout.p=0"], DEPTH0)
    assert incompatibility(base) is None and use_population(base, DEPTH0)
    for p, a, b in zip(DEPTH0, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # weights, history, extra (val R²), penalty curve
        ca, cb = (torch.load(tmp_path / d / point_name(p) / "checkpoint.pt", weights_only=True)
                  for d in ("pop", "lone"))
        assert cb["regularizers"][-1]["aux"]["weight"].shape == (2, 40)  # read from the 40 inputs
        for k in ("weight", "bias"):
            torch.testing.assert_close(ca["regularizers"][-1]["aux"][k], cb["regularizers"][-1]["aux"][k],
                                       atol=ATOL, rtol=RTOL)
    assert pop[0]["extra"] != pop[1]["extra"]
