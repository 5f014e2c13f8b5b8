"""Schedules follow their formulas; optimizers are the textbook updates."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from regexp.config import AdamConfig, SchedulerConfig, SGDConfig
from regexp.optim import build_optimizer, lr_factor


def sched(**kw):
    return OmegaConf.merge(OmegaConf.structured(SchedulerConfig), kw)


def test_constant_and_step():
    f = lr_factor(sched(name="constant"), 100)
    assert [f(t) for t in (0, 50, 99)] == [1.0, 1.0, 1.0]
    f = lr_factor(sched(name="step", step_size=10, gamma=0.5), 100)
    assert [f(t) for t in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


def test_warmup_then_cosine():
    f = lr_factor(sched(name="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1), 110)
    assert [f(t) for t in range(10)] == pytest.approx([(t + 1) / 10 for t in range(10)])
    for t in (10, 35, 60, 109):
        assert f(t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (t - 10) / 100)))


def test_cosine_restarts_with_growing_cycles():
    f = lr_factor(sched(name="cosine_restarts", period=10, period_mult=2.0), 1000)
    assert f(0) == f(10) == f(30) == f(70) == 1.0  # cycles of 10, 20, 40 steps
    assert f(5) == pytest.approx(0.5) and f(20) == pytest.approx(0.5) and f(50) == pytest.approx(0.5)


def test_one_gd_step_is_the_textbook_exercise():
    w = torch.nn.Parameter(torch.tensor([-5.0, -2.0]))
    opt = build_optimizer(OmegaConf.structured(SGDConfig(lr=0.1)), [{"params": [w]}], torch.device("cpu"))
    (0.1 * w[0] ** 2 + 2 * w[1] ** 2).backward()
    opt.step()
    assert w.tolist() == pytest.approx([-4.9, -1.2])


def test_adamw_decay_is_decoupled():
    w = torch.nn.Parameter(torch.tensor([3.0]))
    c = OmegaConf.structured(AdamConfig(name="adamw", lr=0.1, weight_decay=0.5))
    opt = build_optimizer(c, [{"params": [w]}], torch.device("cpu"))
    (w * 0).sum().backward()  # zero gradient: only the decay moves the weight
    opt.step()
    assert w.item() == pytest.approx(3.0 * (1 - 0.1 * 0.5))
