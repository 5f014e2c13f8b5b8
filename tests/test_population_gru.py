"""GRU populations (regexp/population/stacked_gru.py) against lone runs and lone nn.GRU modules.

Stated tolerance (as tests/test_population.py): after 2 epochs every parameter of a member
agrees with its lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| (float32; only the
summation order inside the batched products differs), and every logged metric within a
relative 1e-4. The stacked forward equals each lone ``nn.GRU`` classifier's within 1e-6
absolute (measured at most 1.5e-7). Padded units hold exactly 0 and get exactly 0 gradient.
"""
from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F

from regexp.models.gru import GRUClassifier
from regexp.population import use_population
from regexp.population.compat import NOT_FOR_MODEL, bucket_widths, gru_cost, incompatibility
from regexp.population.optim import StackedOptimizer
from regexp.population.stacked_gru import StackedGRU
from test_population import _assert_same_run, _pop_and_lone

FORWARD_ATOL = 1e-6
SIZES = [3, 6, 5]  # padded to 6
# (bidirectional, layers, head, input shape): a signal of 40 steps, an image read row by row
LAYOUTS = [(True, 1, "flatten", (1, 40)), (False, 1, "flatten", (1, 40)), (True, 2, "last", (1, 40)),
           (False, 2, "last", (1, 40)), (True, 2, "flatten", (2, 5, 3)), (False, 1, "last", (2, 5, 3))]


def _members(sizes: List[int], bidirectional=True, layers=1, head="flatten", shape=(1, 40)):
    torch.manual_seed(0)
    return [GRUClassifier(shape, 10, h, layers, bidirectional, head) for h in sizes]


def _lone_logits(model, x: torch.Tensor, shape) -> torch.Tensor:
    return model(x.view(x.shape[0], *shape))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"bi{int(l[0])}-l{l[1]}-{l[2]}-{len(l[3])}d")
def test_stacked_forward_equals_each_lone_gru(layout):
    bidirectional, layers, head, shape = layout
    models = _members(SIZES, bidirectional, layers, head, shape)
    net = StackedGRU(models, SIZES, 6, shape, torch.device("cpu"))
    x = torch.randn(3, 7, int(torch.tensor(shape).prod()))
    out = net.forward(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], _lone_logits(m, x[i], shape), atol=FORWARD_ATOL, rtol=0)
        state = net.member_state(i)
        assert list(state) == list(m.state_dict())  # the lone names, in the lone order
        assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    # evaluation: class-major, in chunks of 4 examples
    torch.testing.assert_close(net.eval_logits(x, 4).transpose(1, 2), out.detach(), atol=FORWARD_ATOL, rtol=0)
    # stacking the member states back gives the stacked tensors
    again = net.stack_states([net.member_state(i) for i in range(3)])
    assert all(torch.equal(a, p.detach()) for a, p in zip(again, net.params))


@pytest.mark.parametrize("bidirectional,layers", [(True, 2), (False, 1)])
def test_padded_units_stay_zero_with_zero_gradient(bidirectional, layers):
    models = _members(SIZES, bidirectional, layers)
    net = StackedGRU(models, SIZES, 6, (1, 40), torch.device("cpu"))
    masks = net.param_masks()
    assert all(bool((~real).any()) for real, (n, _, _) in zip(masks, net.named_params()) if n != "head.bias")
    x, y = torch.randn(3, 8, 40), torch.randint(0, 10, (3, 8))
    opt = StackedOptimizer("adam", net.params, {"lr": [0.01, 0.02, 0.005], "beta1": [0.9] * 3, "beta2": [0.999] * 3,
                                                "eps": [1e-8] * 3, "weight_decay": [0.01] * 3}, False,
                           torch.device("cpu"))
    net.record = True
    for _ in range(3):
        for p in net.params:
            p.grad = None
        logits = net.forward(x)
        # the padded hidden units' features are exactly zero at every step, both directions
        feats = net.head_input.detach()
        assert torch.equal(feats * (1 - net.unit_mask), torch.zeros_like(feats))
        F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1)).backward()
        for (name, p, _), real in zip(net.named_params(), masks):
            assert torch.equal(p.grad[~real], torch.zeros_like(p.grad[~real])), name
            assert bool((p.grad[real] != 0).any()), name  # the real entries did get a gradient
        opt.step(1.0)
        for (name, p, _), real in zip(net.named_params(), masks):
            assert torch.equal(p.detach()[~real], torch.zeros_like(p.detach()[~real])), name
    # after the updates each member still computes its lone model's function with its weights
    out = net.forward(x)
    for i, m in enumerate(models):
        m.load_state_dict(net.member_state(i))
        torch.testing.assert_close(out[i], m(x[i].view(8, 1, 40)), atol=FORWARD_ATOL, rtol=0)


def test_keep_drops_members():
    models = _members(SIZES, layers=2)
    net = StackedGRU(models, SIZES, 6, (1, 40), torch.device("cpu"))
    x = torch.randn(3, 4, 40)
    before = net.forward(x).detach()
    net.keep(torch.tensor([0, 2]))
    assert net.widths.tolist() == [3, 5] and net.unit_mask.shape == (2, 1, 2 * 6 * 40)
    torch.testing.assert_close(net.forward(x[[0, 2]]).detach(), before[[0, 2]], atol=FORWARD_ATOL, rtol=0)


def test_cost_counts_the_gates_products_and_the_head():
    # hidden 6, bidirectional, one layer, flatten head on MNIST-1D (1, 40): the paper's GRU
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"bidirectional": True, "layers": 1, "head": "flatten"})
    cost = gru_cost(cfg, (1, 40), 10)
    assert cost(6) == 40 * 2 * 3 * 6 * (1 + 6) + 40 * 2 * 6 * 10
    two = gru_cost(OmegaConf.merge(cfg, {"layers": 2, "head": "last"}), (1, 40), 10)
    assert two(6) == 40 * 2 * (3 * 6 * 7 + 3 * 6 * 18) + 2 * 6 * 10
    assert bucket_widths([6, 12, 24], cost=cost) == [[6, 12, 24]]  # small: one bucket


@pytest.mark.parametrize("layout", [["model.layers=1"], ["model.layers=2", "model.bidirectional=false",
                                                         "model.head=last"]], ids=["bi-flatten", "uni2-last"])
def test_members_of_different_hidden_sizes_match_lone_runs(compose_cfg, tmp_path, layout):
    # three hidden sizes padded into one bucket; each member with its own seed, lr, weight
    # decay λ, input noise σ and dropout p (it draws its lone run's noise and masks, the hidden
    # site's laid over its own features of either head)
    points = [{"model.hidden_size": 4, "optimizer.lr": 0.01, "regularizer.weight_decay.lam": 0.001,
               "regularizer.input_noise.sigma": 0.1, "regularizer.dropout.p": 0.2, "seed": 0},
              {"model.hidden_size": 8, "optimizer.lr": 0.003, "regularizer.weight_decay.lam": 0.01,
               "regularizer.input_noise.sigma": 0.0, "regularizer.dropout.p": 0.0, "seed": 1},
              {"model.hidden_size": 6, "optimizer.lr": 0.005, "regularizer.weight_decay.lam": 0.0,
               "regularizer.input_noise.sigma": 0.05, "regularizer.dropout.p": 0.1, "seed": 2}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        "data.n_train=400", "model=gru", *layout, "optimizer=adam", "regularizer=[weight_decay,input_noise,dropout]",
        "regularizer.dropout.input_p=0.1"], points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert len({m["final"]["train_loss"] for m in pop}) == 3


@pytest.mark.parametrize("reg", sorted(NOT_FOR_MODEL["gru"]))
def test_regularizers_a_lone_gru_refuses_are_refused(compose_cfg, reg):
    why = incompatibility(compose_cfg(["model=gru", f"regularizer=[{reg}]"]))
    assert why is not None and reg in why and "gru" in why and "\n" not in why
    assert incompatibility(compose_cfg(["model=gru", "regularizer=[dropout,l1]"])) is None


def test_interrupted_gru_population_resumes_to_its_lone_runs(compose_cfg, tmp_path, monkeypatch):
    # SIGTERM in the middle of epoch 2: each member's checkpoint holds its unpadded nn.GRU
    # weights and Adam moments; the re-launch stacks them back (padding zero) and ends at the
    # lone result
    from test_population_stop_transfer import _interrupt_resume_and_lone
    points = [{"model.hidden_size": 4, "optimizer.lr": 0.01, "seed": 0},
              {"model.hidden_size": 7, "optimizer.lr": 0.003, "seed": 1}]
    stopped, _, _ = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, [
        "data.n_train=400", "model=gru", "optimizer=adam", "trainer.epochs=2"], points, 1)
    assert [m["status"] for m in stopped] == ["interrupted"] * 2 and [m["epochs"] for m in stopped] == [1, 1]


def test_gru_member_probes_equal_lone_run_probes(compose_cfg, tmp_path):
    # the Hessian and sharpness probes see each member through the stacked forward, padding
    # (hidden 3 inside 5) masked out
    from test_population_probes import PROBES, _runs
    points = [{"model.hidden_size": 3, "seed": 0}, {"model.hidden_size": 5, "seed": 1}]
    pop, lone = _runs(compose_cfg, tmp_path, PROBES + ["model=gru", "trainer.epochs=1"], points)
    for p, a, b in zip(points, pop, lone):
        assert [r["epoch"] for r in a["probe_history"]] == [r["epoch"] for r in b["probe_history"]] == [1]
        for k, v in b["probe_history"][0].items():
            assert a["probe_history"][0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (p, k)
