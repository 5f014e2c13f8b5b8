"""SAM / ASAM (``optimizer=sam``): one step against a hand-written two-step update."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from regexp.config import SAMConfig
from regexp.data import load_data
from regexp.errors import ConfigError
from regexp.models import build_model
from regexp.optim import build_optimizer
from regexp.population import use_population
from regexp.train.trainer import seed_everything, train


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, x, y


def grads_at(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def sam_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(SAMConfig), kw)


def by_hand(model, x, y, rho, adaptive, eta, base_step):
    """ε = ρ g/‖g‖ (ASAM: ρ T²g/‖Tg‖, T = |w| + η); gradient at w + ε; base step from w."""
    w = [p.detach().clone() for p in model.parameters()]
    g = grads_at(model, x, y)
    T = [wi.abs() + eta if adaptive else torch.ones_like(wi) for wi in w]
    norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(T, g)))
    ascended = copy.deepcopy(model)
    with torch.no_grad():
        for p, wi, t, gi in zip(ascended.parameters(), w, T, g):
            p.copy_(wi + rho * t * t * gi / norm)
    g_sam = grads_at(ascended, x, y)
    return base_step(w, g_sam)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_sgd_step_equals_hand_written_update(adaptive):
    model, x, y = problem()
    lr, rho = 0.1, 0.3
    expected = by_hand(model, x, y, rho, adaptive, 0.01, lambda w, g: [wi - lr * gi for wi, gi in zip(w, g)])
    opt = build_optimizer(sam_cfg(base="sgd", lr=lr, rho=rho, adaptive=adaptive),
                          [{"params": list(model.parameters())}], torch.device("cpu"))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_sam_adam_step_equals_adam_step_with_the_ascended_gradient():
    model, x, y = problem()
    twin = copy.deepcopy(model)
    g_sam = by_hand(model, x, y, 0.05, False, 0.01, lambda w, g: g)
    # the base optimizer's own step from w, fed the gradient at w + ε
    ref = torch.optim.Adam(twin.parameters(), lr=0.01)
    for p, g in zip(twin.parameters(), g_sam):
        p.grad = g
    ref.step()
    opt = build_optimizer(sam_cfg(base="adam", lr=0.01, rho=0.05), [{"params": list(model.parameters())}],
                          torch.device("cpu"))
    grads_at(model, x, y)
    opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward()))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()


def test_sam_refuses_a_step_without_closure():
    model, x, y = problem()
    opt = build_optimizer(sam_cfg(), [{"params": list(model.parameters())}], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_trainer_takes_the_sam_step(compose_cfg, tmp_path):
    # one full-batch step of the trainer = the hand-written SAM update from its initial weights
    cfg = compose_cfg(["optimizer=sam", "optimizer.lr=0.5", "optimizer.rho=0.2", "data.n_train=300",
                       "trainer.batch_size=full", "trainer.epochs=1", "trainer.progress=false",
                       "trainer.threads=1", "logger.histogram_every=0", "data.val_fraction=0"])
    data = load_data(cfg.data, cfg.seed)
    seed_everything(cfg.seed)  # as train() does after loading the data
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    x, y = data.split("train")
    expected = by_hand(model, x, y, 0.2, False, 0.01, lambda w, g: [wi - 0.5 * gi for wi, gi in zip(w, g)])
    train(cfg, tmp_path)
    got = torch.load(tmp_path / "model.pt", weights_only=True)
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(got[name], e.to(got[name].dtype), rtol=1e-5, atol=1e-6)


def test_sam_config_checks_and_population_choice(compose_cfg):
    from regexp.config import validate

    with pytest.raises(ConfigError, match="optimizer.base='rmsprop' is invalid: expected one of sgd, momentum"):
        validate(compose_cfg(["optimizer=sam", "optimizer.base=rmsprop"]))
    with pytest.raises(ConfigError, match=r"optimizer.rho=0.0 is invalid: expected a number > 0"):
        validate(compose_cfg(["optimizer=sam", "optimizer.rho=0"]))
    base = ["optimizer=sam", "trainer.epochs=1", "data.n_train=200"]
    assert use_population(compose_cfg(base), [{"seed": 0}])  # the population takes SAM's two passes
    # ASAM's radius may exceed 1 (Adadelta's rho may not)
    validate(compose_cfg(["optimizer=sam", "optimizer.rho=2.0", "optimizer.adaptive=true"]))


@pytest.mark.parametrize("experiment", ["function_fits", "optimizer_paths"])
def test_tasks_with_their_own_loop_refuse_sam(cli, experiment):
    bad = cli([f"+experiment={experiment}", "optimizer=sam"], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: optimizer='sam' is invalid: expected ")
