"""CNN populations (regexp/population/stacked_cnn.py) against lone runs, and their padding.

Stated tolerance (as tests/test_population.py): after 2 epochs every parameter of a member
agrees with its lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| (float32; only the
summation order inside the grouped convolution and the head's batched product differs), and
every logged metric within a relative 1e-4.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regexp.models.cnn import CNN
from regexp.population.compat import bucket_width, bucket_widths, cnn_cost
from regexp.population.optim import StackedOptimizer
from regexp.population.stacked_cnn import StackedCNN
from test_population import _assert_same_run, _pop_and_lone

SMALL = ["data.n_train=600"]  # 15 steps of 32 per epoch: the lone runs stay cheap


def test_adam_members_of_different_channels_match_lone_runs(compose_cfg, tmp_path):
    # the MNIST-1D paper's ConvBase layout (strided, no pooling, flatten head), three widths
    # padded into one bucket, each member with its own lr, β2, weight decay, smoothing and seed
    points = [{"model.channels": [4, 6, 5], "optimizer.lr": 0.01, "optimizer.beta2": 0.99,
               "regularizer.weight_decay.lam": 0.001, "regularizer.label_smoothing.eps": 0.1, "seed": 0},
              {"model.channels": [8, 8, 8], "optimizer.lr": 0.003, "optimizer.beta2": 0.999,
               "regularizer.weight_decay.lam": 0.0, "regularizer.label_smoothing.eps": 0.0, "seed": 1},
              {"model.channels": [2, 3, 8], "optimizer.lr": 0.02, "optimizer.beta2": 0.999,
               "regularizer.weight_decay.lam": 0.01, "regularizer.label_smoothing.eps": 0.05, "seed": 2}]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "model=cnn_mnist1d", "optimizer=adam", "regularizer=[weight_decay,label_smoothing]"], points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert len({m["final"]["train_loss"] for m in pop}) == 3


def test_momentum_members_with_pooling_gap_head_and_noise_match_lone_runs(compose_cfg, tmp_path):
    # max-pooling stages and a global-average-pooling head; L1 + decoupled decay, per-member
    # clipping norms and input noise σ (each member draws its lone run's noise)
    points = [{"model.channels": [3, 5], "optimizer.lr": 0.05, "optimizer.momentum": 0.9,
               "regularizer.l1.lam": 1e-4, "regularizer.decoupled_weight_decay.lam": 0.01,
               "regularizer.input_noise.sigma": 0.1, "trainer.grad_clip": 0.5, "seed": 0},
              {"model.channels": [6, 4], "optimizer.lr": 0.02, "optimizer.momentum": 0.5,
               "regularizer.l1.lam": 0.0, "regularizer.decoupled_weight_decay.lam": 0.0,
               "regularizer.input_noise.sigma": 0.0, "trainer.grad_clip": None, "seed": 1}]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "model=cnn", "model.pool=max", "model.kernel_size=3", "optimizer=momentum",
        "regularizer=[l1,decoupled_weight_decay,input_noise]"], points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


@pytest.mark.parametrize("head,pool,act,stride,pad", [("gap", "max", "relu", 1, None),
                                                      ("flatten", "none", "relu", 2, 1),
                                                      ("flatten", "avg", "sigmoid", 1, None),
                                                      ("flatten", "max", "tanh", 1, None)])
def test_padded_channels_stay_zero_with_zero_gradient(head, pool, act, stride, pad):
    torch.manual_seed(0)
    chans = [(3, 5, 4), (8, 8, 8), (2, 6, 7)]
    models = [CNN((1, 40), 10, list(c), [5, 3, 3], pool, "none", act, stride, pad, head) for c in chans]
    width = bucket_width(chans)
    assert width == (8, 8, 8)
    net = StackedCNN(models, chans, width, (1, 40), torch.device("cpu"))
    optim = StackedOptimizer("adam", net.params, {"lr": [0.1, 0.2, 0.05], "beta1": [0.9] * 3,
                                                  "beta2": [0.999] * 3, "eps": [1e-8] * 3,
                                                  "weight_decay": [0.0] * 3}, False, torch.device("cpu"))
    x, y = torch.randn(3, 16, 40), torch.randint(0, 10, (3, 16))
    masks = net.param_masks()
    for _ in range(3):
        for p in net.params:
            p.grad = None
        F.cross_entropy(net.forward(x).reshape(-1, 10), y.reshape(-1)).backward()
        for p, real in zip(net.params, masks):
            assert torch.equal(p.grad[~real], torch.zeros_like(p.grad[~real]))
        optim.step(1.0)
        for p, real in zip(net.params, masks):
            assert torch.equal(p.detach()[~real], torch.zeros_like(p.detach()[~real]))
    # each member computes what its lone model computes with the same (unpadded) weights
    logits = net.forward(x).detach()
    counts = torch.zeros(3, 2, dtype=torch.long)
    torch.testing.assert_close(net.eval_logits(x, 5, counts).transpose(1, 2), logits, atol=1e-5, rtol=1e-5)
    for i, m in enumerate(models):
        state = net.member_state(i)
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in m.state_dict().items()}
        m.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(logits[i], m(x[i].view(16, 1, 40)), atol=1e-5, rtol=1e-5)
        # hidden activations that are exactly 0, counted over the member's real channels only
        acts = []
        hooks = [s.register_forward_hook(lambda mod, i_, a: acts.append(a)) for s in m.features
                 if type(s).__name__ == "Site"]
        with torch.no_grad():
            m(x[i].view(16, 1, 40))
        for h in hooks:
            h.remove()
        assert int(counts[i, 0]) == sum(int((a == 0).sum()) for a in acts)
        assert net.hidden_units(i) * 16 == sum(a.numel() for a in acts)


def test_channel_buckets_by_cost_never_mix_depths():
    cost = cnn_cost(_model_cfg(), (1, 40), 10)
    # (k, k, k): cost grows ~k², so ratio 1.5 separates 8 from 16 but small widths share
    assert bucket_widths([(2, 2, 2), (4, 4, 4), (8, 8, 8), (16, 16, 16)], 1.5, 4, cost) == \
        [[(2, 2, 2), (4, 4, 4)], [(8, 8, 8)], [(16, 16, 16)]]
    assert bucket_widths([(4, 4), (4, 4, 4)], 1.5, 32, cost) == [[(4, 4)], [(4, 4, 4)]]
    assert bucket_width([(2, 8), (6, 4)]) == (6, 8)


def _model_cfg():
    from omegaconf import OmegaConf

    return OmegaConf.create({"name": "cnn", "channels": [25, 25, 25], "kernel_size": [5, 3, 3], "stride": 2,
                             "padding": 1, "pool": "none", "head": "flatten", "norm": "none",
                             "activation": "relu", "init": "default", "init_std": 0.01, "init_a": None})


def test_a_cnn_bucket_is_batched_without_measuring(monkeypatch):
    # a CNN has no member-by-member loop: even an explicit loop_width keeps it batched
    from types import SimpleNamespace

    from regexp.population import tuning

    monkeypatch.setattr(tuning, "cached_choice", lambda *a: pytest.fail("measured a CNN's step forms"))
    chans = [(3, 5), (8, 8)]
    models = [CNN((1, 40), 10, list(c), [5, 3], "max", "none", "relu", 1, None, "gap") for c in chans]
    net = StackedCNN(models, chans, bucket_width(chans), (1, 40), torch.device("cpu"))
    b = SimpleNamespace(net=net, device=torch.device("cpu"), members=[None, None])
    assert tuning.choose_loop(b, 1, 100, False).loop is False and net.loop is False


def test_mlp_width_lists_and_cnn_channels_stay_apart():
    from omegaconf import OmegaConf

    from regexp.population.compat import hidden_widths, member_width, widths_cost

    mlp = OmegaConf.create({"name": "mlp", "width": 8, "depth": 2, "widths": [40, 20, 24]})
    assert member_width(mlp) == 40 and hidden_widths(mlp) == [40, 20, 24]
    assert member_width(OmegaConf.merge(mlp, {"widths": None})) == 8
    assert member_width(_model_cfg()) == (25, 25, 25) and hidden_widths(_model_cfg()) == [25, 25, 25]
    # lists of hidden widths of two depths never share a bucket, whatever their cost
    assert bucket_widths([(8, 8), (8, 8, 8), (10, 8)], 1.5, 32, widths_cost(40, 10)) == \
        [[(8, 8), (10, 8)], [(8, 8, 8)]]
