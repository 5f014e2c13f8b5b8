"""Transformer populations (regexp/population/stacked_transformer.py) against lone runs.

Stated tolerance (as tests/test_population.py): after 2 epochs every parameter of a member
agrees with its lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| (float32; only the
summation order inside the batched products, the attention kernel's and the masked layer
norm's differ), and every logged metric within a relative 1e-4. The stacked forward equals
each lone ``nn.TransformerEncoder`` forward within 1e-5 absolute.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regexp.models.transformer import Transformer
from regexp.population import use_population
from regexp.population.compat import NOT_FOR_MODEL, NOT_FOR_NEW_MODELS, bucket_widths, incompatibility, transformer_cost
from regexp.population.optim import StackedOptimizer
from regexp.population.stacked_transformer import StackedTransformer
from test_population import _assert_same_run, _pop_and_lone

SMALL = ["data.n_train=400", "model=transformer", "model.depth=1", "model.heads=2", "model.mlp_ratio=2.0"]
DIMS = [8, 12, 16]  # head dims 4, 6, 8: each member's own attention scale and layer-norm count


def _members(dims, depth=2):
    torch.manual_seed(0)
    return [Transformer((1, 40), 10, e, depth, 2, 2.0, 1) for e in dims]


def test_members_of_different_embed_dims_match_lone_runs(compose_cfg, tmp_path):
    # three embedding dimensions padded into one bucket; each member with its own seed, lr,
    # weight decay λ and input noise σ (it draws its lone run's noise)
    # Adam's ε is set well above float32 rounding: the key bias's gradient is exactly zero in
    # exact arithmetic (adding q·b_k to every score of a query leaves its softmax unchanged), so
    # with ε = 1e-8 Adam turns the lone run's rounding noise (~1e-9) into steps of size lr, which
    # no other summation order reproduces (two lone runs differing only in order differ as much);
    # at ε = 1e-6 it still moves the key bias by ~1e-5 in 16 steps, at the edge of the tolerance.
    points = [{"model.embed_dim": 8, "optimizer.lr": 0.003, "optimizer.eps": 1e-5,
               "regularizer.weight_decay.lam": 0.001, "regularizer.input_noise.sigma": 0.1, "seed": 0},
              {"model.embed_dim": 12, "optimizer.lr": 0.001, "optimizer.eps": 1e-4,
               "regularizer.weight_decay.lam": 0.01, "regularizer.input_noise.sigma": 0.0, "seed": 1},
              {"model.embed_dim": 16, "optimizer.lr": 0.002, "optimizer.eps": 1e-5,
               "regularizer.weight_decay.lam": 0.0, "regularizer.input_noise.sigma": 0.05, "seed": 2}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=adam", "regularizer=[weight_decay,input_noise]"], points)
    from regexp.population.data import load_cached
    ds = load_cached(base, {})
    assert bucket_widths(DIMS, cost=transformer_cost(base.model, ds.input_shape, 10)) == [DIMS]  # padded together
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert len({m["final"]["train_loss"] for m in pop}) == 3


def test_stacked_forward_equals_each_lone_transformer_and_padding_stays_zero():
    models = _members(DIMS)
    net = StackedTransformer(models, DIMS, 16, (1, 40), torch.device("cpu"))
    x, y = torch.randn(3, 6, 40), torch.randint(0, 10, (3, 6))
    out = net.forward(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x[i].view(6, 1, 40)), atol=1e-5, rtol=0)
        lone = m.state_dict()
        assert all(torch.equal(net.member_state(i)[k], v) for k, v in lone.items())
    ev = net.eval_logits(x, 4)  # class-major, in chunks
    torch.testing.assert_close(ev.transpose(1, 2), out.detach(), atol=1e-5, rtol=0)
    masks = net.param_masks()
    assert all(bool((~r).any()) for r, (n, _, _) in zip(masks, net.named_params()) if n != "head.bias")
    opt = StackedOptimizer("adam", net.params, {"lr": [0.1, 0.2, 0.05], "beta1": [0.9] * 3, "beta2": [0.999] * 3,
                                                "eps": [1e-8] * 3, "weight_decay": [0.0] * 3}, False,
                           torch.device("cpu"))
    for _ in range(3):
        for p in net.params:
            p.grad = None
        F.cross_entropy(net.forward(x).reshape(-1, 10), y.reshape(-1)).backward()
        for (name, p, _), real in zip(net.named_params(), masks):
            assert torch.equal(p.grad[~real], torch.zeros_like(p.grad[~real])), name
        opt.step(1.0)
        for (name, p, _), real in zip(net.named_params(), masks):
            assert torch.equal(p.detach()[~real], torch.zeros_like(p.detach()[~real])), name
    # after the updates each member still computes its lone model's function with its weights
    out = net.forward(x)
    for i, m in enumerate(models):
        m.load_state_dict(net.member_state(i))
        torch.testing.assert_close(out[i], m(x[i].view(6, 1, 40)), atol=1e-5, rtol=0)


def test_keep_drops_members_and_their_scales():
    models = _members(DIMS, depth=1)
    net = StackedTransformer(models, DIMS, 16, (1, 40), torch.device("cpu"))
    x = torch.randn(3, 4, 40)
    before = net.forward(x).detach()
    net.keep(torch.tensor([0, 2]))
    torch.testing.assert_close(net.forward(x[[0, 2]]).detach(), before[[0, 2]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("reg", sorted({**NOT_FOR_NEW_MODELS, **NOT_FOR_MODEL["transformer"]}))
def test_unstacked_transformer_regularizers_are_refused(compose_cfg, reg):
    cfg = compose_cfg(["model=transformer", f"regularizer=[{reg}]"])
    why = incompatibility(cfg)
    assert why is not None and reg in why and "transformer" in why and "\n" not in why
    assert incompatibility(compose_cfg(["model=transformer", "regularizer=[weight_decay]"])) is None
    assert use_population(compose_cfg(["model=transformer"]), [{"model.embed_dim": 8, "seed": 0}])


def test_transformer_member_probes_equal_lone_run_probes(compose_cfg, tmp_path):
    # the Hessian and sharpness probes see each member through the stacked forward, padding
    # (embed_dim 4 inside 8) masked out
    from test_population_probes import PROBES, _runs
    points = [{"model.embed_dim": 4, "seed": 0}, {"model.embed_dim": 8, "seed": 1}]
    pop, lone = _runs(compose_cfg, tmp_path, PROBES + SMALL[1:] + ["model.patch_size=4", "trainer.epochs=1"],
                      points)
    for p, a, b in zip(points, pop, lone):
        assert [r["epoch"] for r in a["probe_history"]] == [r["epoch"] for r in b["probe_history"]] == [1]
        for k, v in b["probe_history"][0].items():
            assert a["probe_history"][0][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (p, k)


def test_interrupted_transformer_population_resumes_to_its_lone_runs(compose_cfg, tmp_path, monkeypatch):
    # SIGTERM in the middle of epoch 2: each member's checkpoint holds its unpadded weights and
    # Adam moments; the re-launch stacks them back (padding zero) and ends at the lone result
    from test_population_stop_transfer import _interrupt_resume_and_lone
    points = [{"model.embed_dim": 4, "optimizer.lr": 0.003, "seed": 0},
              {"model.embed_dim": 8, "optimizer.lr": 0.001, "seed": 1}]
    stopped, _, _ = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, SMALL + [  # ε: see above
        "model.patch_size=4", "optimizer=adam", "optimizer.eps=1e-4", "trainer.epochs=2"], points, 1)
    assert [m["status"] for m in stopped] == ["interrupted"] * 2 and [m["epochs"] for m in stopped] == [1, 1]


def test_a_transformer_bucket_is_batched_without_measuring(monkeypatch):
    # no member-by-member loop: even an explicit loop_width keeps it batched, nothing measured
    from types import SimpleNamespace

    from regexp.population import tuning

    monkeypatch.setattr(tuning, "cached_choice", lambda *a: pytest.fail("measured a Transformer's step forms"))
    net = StackedTransformer(_members([8, 12]), [8, 12], 12, (1, 40), torch.device("cpu"))
    b = SimpleNamespace(net=net, device=torch.device("cpu"), members=[None, None])
    assert tuning.choose_loop(b, 1, 100, False).loop is False and net.loop is False
