"""Adam's and AdamW's amsgrad in a population: torch's update (the maximum of the second-moment
estimates, ``max_exp_avg_sq``), each member equal to its lone run, checkpoints under torch's names.

Stated tolerances (float32): against ``torch.optim.Adam(amsgrad=True)`` / ``AdamW`` on plain
``torch.nn`` models, 200 steps end within 1e-4 + 1e-3·|b| (as tests/test_population_engine.py:
the step divides by a root mean square, which amplifies the last-bit differences of the batched
products); members against their lone ``train()`` runs within |a - b| <= 1e-5 + 1e-4·|b|
(tests/test_population.py), optimizer state included.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.population import use_population
from regexp.population.optim import StackedOptimizer
from regexp.population.stacked_mlp import StackedMLP
from regexp.sweep import point_name
from test_population import _assert_same_run, _pop_and_lone
from test_population_stop_transfer import _interrupt_resume_and_lone

STEPS = 200
MEMBERS = [dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01),
           dict(lr=0.003, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)]


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("members", [1, 2])  # 1: shared values (torch's fused kernel); 2: per member
def test_stacked_amsgrad_equals_torch_for_200_steps(name, members):
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    kws = [{**kw, "weight_decay": kw["weight_decay"] if name == "adamw" else 0.0} for kw in MEMBERS[:members]]
    widths = [12, 7][:members]
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    models = [nn.Sequential(nn.Linear(10, w), nn.ReLU(), nn.Linear(w, 4)) for w in widths]
    net = StackedMLP(models, widths, max(widths), "relu", torch.device("cpu"))
    hp = {"lr": [kw["lr"] for kw in kws], "beta1": [kw["betas"][0] for kw in kws],
          "beta2": [kw["betas"][1] for kw in kws], "eps": [kw["eps"] for kw in kws],
          "weight_decay": [kw["weight_decay"] for kw in kws]}
    opt = StackedOptimizer(name, net.params, hp, False, torch.device("cpu"), amsgrad=True)
    refs = [cls(m.parameters(), amsgrad=True, **kw) for m, kw in zip(models, kws)]
    for step in range(STEPS):
        # a large gradient early, small ones after: the running maximum then stays above the
        # second moment, so amsgrad's step differs from Adam's
        scale = 10.0 if step < 20 else 1.0
        idx = torch.arange(step * 16, step * 16 + 16) % 64
        xb, yb = x[idx], y[idx]
        for m, o in zip(models, refs):
            o.zero_grad(set_to_none=True)
            (scale * F.cross_entropy(m(xb), yb)).backward()
            o.step()
        for p in net.params:
            p.grad = None
        logits = net.forward(xb.expand(len(models), -1, -1))
        (scale * F.cross_entropy(logits.reshape(-1, 4), yb.repeat(len(models)), reduction="sum").div(16)).backward()
        opt.step(1.0)
    assert opt.fused == (members == 1)
    states = opt.member_state(0)
    assert set(states[0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    for k, (m, o) in enumerate(zip(models, refs)):
        lin = [mod for mod in m if isinstance(mod, nn.Linear)]
        w = widths[k]
        ours = [net.weights[0][k, :w], net.biases[0][k, 0, :w], net.weights[1][k, :, :w], net.biases[1][k, 0]]
        vmax = opt.state["max_exp_avg_sq"]
        ours_max = [vmax[0][k, :w], vmax[1][k, 0, :w], vmax[2][k, :, :w], vmax[3][k, 0]]
        for a, b, mx, p in zip(ours, [lin[0].weight, lin[0].bias, lin[1].weight, lin[1].bias], ours_max,
                               [lin[0].weight, lin[0].bias, lin[1].weight, lin[1].bias]):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(mx, o.state[p]["max_exp_avg_sq"], atol=1e-6, rtol=1e-3)
            # the maximum acted: well above the current second moment
            assert bool((o.state[p]["max_exp_avg_sq"] > 2 * o.state[p]["exp_avg_sq"]).any())
    if members == 2:  # padding stays exactly zero, its maximum too
        assert torch.count_nonzero(net.weights[0][1, widths[1]:]) == 0
        assert torch.count_nonzero(opt.state["max_exp_avg_sq"][0][1, widths[1]:]) == 0


@pytest.mark.parametrize("name,regs", [("adam", []), ("adamw", []), ("adam", ["regularizer=[multi_task]"]),
                                       ("adamw", ["regularizer=[soft_weight_sharing]"])])
def test_amsgrad_members_match_lone_runs(compose_cfg, tmp_path, name, regs):
    """Per-member lr and betas (the foreach step) and widths (padding); the lone run's one torch
    optimizer takes amsgrad for its regularizers' groups too (multi_task's head, the learned
    mixture), and so do the population's stacked ones. The checkpoint's optimizer state,
    max_exp_avg_sq included, is the lone run's (compared by _assert_same_run)."""
    points = [{"model.width": 16, "seed": 0, "optimizer.lr": 0.01, "optimizer.beta2": 0.99},
              {"model.width": 12, "seed": 1, "optimizer.lr": 0.003, "optimizer.beta2": 0.999}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        f"optimizer={name}", "optimizer.amsgrad=true", "data.n_train=300", "trainer.batch_size=50"] + regs, points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
        ck = torch.load(tmp_path / "pop" / point_name(p) / "checkpoint.pt", weights_only=True)
        assert all("max_exp_avg_sq" in st for st in ck["optimizer"]["state"].values())
        assert ck["optimizer"]["param_groups"][0]["amsgrad"] is True


def test_amsgrad_population_resumes_to_its_lone_runs(compose_cfg, tmp_path, monkeypatch):
    """SIGTERM in the middle of epoch 2: the checkpoints carry max_exp_avg_sq, read back into the
    stacked state; the re-launched members end where their lone uninterrupted runs end."""
    points = [{"model.width": 12, "seed": 0, "optimizer.lr": 0.01}, {"model.width": 16, "seed": 1}]
    stopped, _, _ = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, [
        "optimizer=adam", "optimizer.amsgrad=true", "trainer.epochs=3"], points, 1)
    assert [m["status"] for m in stopped] == ["interrupted"] * 2
