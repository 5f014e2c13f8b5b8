"""Augmentation, FGSM and DropConnect in a population: each member draws its lone run's numbers.

Each member's shifts and scales, FGSM pass (with its own dropout masks) and DropConnect masks
come from its own generator in its lone run's order, so after 2 epochs every parameter agrees
with the lone ``train()`` run within test_population's float32 tolerance
(|a − b| <= 1e-5 + 1e-4·|b|); the stacked transformations equal the lone ones given the same
generator state.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import StopAfter
from test_population import ATOL, BASE, RTOL, _assert_same_run, _pop_and_lone
from regexp.population import Options, train_population, use_population
from regexp.population.compat import incompatibility
from regexp.population.dropout import MemberDropout
from regexp.population.noise import StepNoise
from regexp.population.stacked_mlp import StackedMLP
from regexp.population.transforms import BatchTransforms
from regexp.regularizers.adversarial import fgsm
from regexp.regularizers.augmentation import augment, draws
from regexp.regularizers.base import REGULARIZERS, Context
from regexp.sweep import point_config, point_name
from regexp.train.trainer import train

CPU = torch.device("cpu")


def _transforms(regs, input_shape, widths, exact=True, dropout=0.0):
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(regs))]
    drop = MemberDropout([0.0] * len(regs), [dropout] * len(regs), gens, widths, 40, max(widths), 1, CPU, exact)
    noise = StepNoise(drop, None, None, [False, False], CPU)
    return BatchTransforms([OmegaConf.create(r) for r in regs], input_shape, noise, CPU), gens


def _lone(name, **values):
    cls = REGULARIZERS[name]
    return cls(OmegaConf.structured(cls.Config(**values)), Context(10, 100, CPU, (1, 40), 0))


# ---------------------------------------------------------------- the stacked transformations
@pytest.mark.parametrize("input_shape", [(1, 40), (2, 6, 7)])
def test_stacked_augmentation_is_each_members_lone_transform(input_shape):
    shifts, scales = [3, 0, 1], [0.1, 0.2, 0.0]
    regs = [{"augmentation": {"shift": s, "scale": c, "flip": True}} for s, c in zip(shifts, scales)]
    t, gens = _transforms(regs, input_shape, [4, 4, 4])
    states = [g.get_state() for g in gens]
    d = int(torch.tensor(input_shape).prod())
    x = torch.randn(3, 16, d)
    out = t.augment(x)
    for m, (s, c) in enumerate(zip(shifts, scales)):
        torch.set_rng_state(states[m])  # a lone run's draws: the global generator, its own padding
        xm = x[m].view(16, *input_shape)
        want = augment(xm, draws(16, len(input_shape) != 2, s, c, True, CPU, xm.dtype), s)
        assert torch.equal(out[m], want.reshape(16, d)), m
        assert torch.equal(gens[m].get_state(), torch.get_rng_state())  # as many numbers drawn
    assert not torch.equal(out[0], x[0])


def test_augmentation_without_shift_or_scale_is_the_identity_in_batched_mode():
    regs = [{"augmentation": {"shift": 0, "scale": 0.0, "flip": True}},
            {"augmentation": {"shift": 2, "scale": 0.1, "flip": True}}]
    t, _ = _transforms(regs, (1, 40), [4, 4], exact=False)
    x = torch.randn(2, 32, 40)
    out = t.augment(x)
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])


def test_stacked_fgsm_is_each_members_lone_fgsm():
    from regexp.models.mlp import MLP

    torch.manual_seed(0)
    models = [MLP(40, 10, w, 2, "relu") for w in (6, 9)]
    net = StackedMLP(models, [6, 9], 9, "relu", CPU)
    x, y = torch.randn(2, 12, 40), torch.randint(0, 10, (2, 12))
    eps = torch.tensor([0.25, 0.0]).view(-1, 1, 1)
    out = fgsm(lambda xa: net.forward(xa), x, y, eps)
    want = fgsm(models[0], x[0], y[0], 0.25)
    torch.testing.assert_close(out[0], want, atol=ATOL, rtol=RTOL)
    assert torch.equal((out[0] - x[0]).sign(), (want - x[0]).sign())  # every input moved its way
    assert torch.equal(out[1], x[1])  # ε = 0: the identity


def test_stacked_adversarial_replaces_the_first_mix_fraction_of_each_members_batch():
    """round(mix·B) = 3 of 9 examples: each member's first three become its own FGSM inputs
    with its own ε, the rest and the labels stay as they were."""
    from regexp.models.mlp import MLP

    torch.manual_seed(0)
    widths, eps = [6, 9], [0.25, 0.1]
    models = [MLP(40, 10, w, 1, "relu") for w in widths]
    net = StackedMLP(models, widths, 9, "relu", CPU)
    regs = [{"adversarial": {"eps": e, "mix": 1 / 3}} for e in eps]
    t, _ = _transforms(regs, (1, 40), widths)
    x, y = torch.randn(2, 9, 40), torch.randint(0, 10, (2, 9))
    out = t.adversarial(x, y, lambda xa, masks, used: net.forward(xa), net.weights, widths)
    for m, (model, e) in enumerate(zip(models, eps)):
        want = fgsm(model, x[m, :3], y[m, :3], e)
        torch.testing.assert_close(out[m, :3], want, atol=ATOL, rtol=RTOL)
        assert torch.allclose((out[m, :3] - x[m, :3]).abs(), torch.full_like(want, e), atol=1e-6)
        assert torch.equal(out[m, 3:], x[m, 3:])


def test_stacked_dropconnect_masks_are_the_lone_layers_masks():
    """Members of widths 5 and 8 with p 0.3 and 0 (p = 0 still draws, as the lone run does):
    each stacked weight a pass computes with is its lone layer's masked weight."""
    from regexp.models.mlp import MLP

    torch.manual_seed(0)
    ps, widths = [0.3, 0.0], [5, 8]
    models = [MLP(40, 10, w, 2, "relu") for w in widths]
    net = StackedMLP(models, widths, 8, "relu", CPU)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    states = [g.get_state() for g in gens]
    drop = MemberDropout([0.0, 0.0], [0.0, 0.0], gens, widths, 40, 8, 2, CPU, True)
    noise = StepNoise(drop, None, None, [False] * 3, CPU, ps, [True, True, False])
    _, used = noise.forward_draws(7, net.weights, widths)
    x = torch.randn(7, 40)
    for m, (model, p) in enumerate(zip(models, ps)):
        reg = _lone("dropconnect", p=p)
        reg.attach(model)
        torch.set_rng_state(states[m])
        model(x)  # training mode: each hidden layer draws its mask
        for l, layer in enumerate(model.hidden[::3]):
            rows, cols = layer.weight.shape
            assert torch.equal(used[l][m, :rows, :cols], layer.weight * layer.last_mask / (1 - p))
            assert torch.equal(used[l][m, rows:], torch.zeros_like(used[l][m, rows:]))  # padding
        assert torch.equal(used[2][m], net.weights[2][m])  # the head is left alone
    assert torch.equal(used[0][1], net.weights[0][1])  # p = 0: the weights themselves
    assert (used[0][0, :5] == 0).float().mean() > 0.2


# ---------------------------------------------------------------- members equal their lone runs
def test_augmentation_per_member_matches_lone_runs(compose_cfg, tmp_path):
    # input noise after augmentation, dropout masks after both: the lone run's order of draws
    points = [{"model.width": 20, "regularizer.augmentation.shift": 3, "regularizer.augmentation.scale": 0.1,
               "seed": 0},
              {"model.width": 28, "regularizer.augmentation.shift": 1, "regularizer.augmentation.scale": 0.0,
               "seed": 1},
              {"model.width": 28, "regularizer.augmentation.shift": 0, "regularizer.augmentation.scale": 0.2,
               "seed": 1}]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        "optimizer=momentum", "regularizer=[augmentation,input_noise,dropout]", "regularizer.dropout.p=0.2",
        "regularizer.input_noise.sigma=0.1"], points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    w1, w2 = (torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)["hidden.0.weight"] for p in points[1:])
    assert (w1 - w2).abs().max() > 1e-3  # the augmentation is real: other values, other weights


@pytest.mark.parametrize("opt,smoothing,draws", [("momentum", 0.0, []), ("sam", 0.1, []),
                                                 ("sam", 0.0, ["dropconnect", "weight_noise"])])
def test_adversarial_per_member_matches_lone_runs(compose_cfg, tmp_path, opt, smoothing, draws):
    """ε differs per member (0: a lone run skips the attack and draws nothing); the FGSM pass
    draws its own dropout masks before the training pass's; hand-written gradients for the
    step (no smoothing) and autograd with SAM's second pass on the same attacked batch (with
    DropConnect and weight noise: the FGSM pass, the step's and SAM's second pass each draw
    their own)."""
    points = [{"model.width": 20, "regularizer.adversarial.eps": 0.1, "seed": 0},
              {"model.width": 28, "regularizer.adversarial.eps": 0.0, "seed": 1},
              {"model.width": 28, "regularizer.adversarial.eps": 0.3, "seed": 1}]
    regs = ",".join(["input_noise", "adversarial", "dropout", "label_smoothing"] + draws)
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        f"optimizer={opt}", f"regularizer=[{regs}]", "regularizer.dropout.p=0.2",
        f"regularizer.label_smoothing.eps={smoothing}"] + (["regularizer.weight_noise.sigma=0.02"] if draws else []),
        points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert "adversarial/fgsm_test_acc" in pop[0]["extra"]
    w1, w2 = (torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)["hidden.0.weight"] for p in points[1:])
    assert (w1 - w2).abs().max() > 1e-3


@pytest.mark.parametrize("loop_width", [0, 1])
def test_dropconnect_per_member_matches_lone_runs(compose_cfg, tmp_path, loop_width):
    """p differs per member (0 included); masks drawn after each layer's dropout mask and before
    its weight noise (attach order), batched and member by member."""
    base = ["optimizer=adam", "regularizer=[dropconnect,dropout,weight_noise]", "regularizer.dropout.p=0.1",
            "regularizer.weight_noise.sigma=0.02", "regularizer.dropconnect.include_head=true"]
    points = [{"model.width": 20, "regularizer.dropconnect.p": 0.3, "seed": 0},
              {"model.width": 28, "regularizer.dropconnect.p": 0.0, "seed": 1},
              {"model.width": 28, "regularizer.dropconnect.p": 0.5, "seed": 1}]
    cfg = compose_cfg(BASE + base)
    assert use_population(cfg, points)
    pop = train_population(cfg, points, tmp_path / "pop", Options(loop_width=loop_width))
    lone = [train(point_config(cfg, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


def test_batched_draws_keep_padding_zero(compose_cfg, tmp_path, monkeypatch):
    """The GPU mode (shared generator: the same distributions, other numbers) on the CPU:
    padded units stay exactly zero and the members train to finite losses."""
    import math

    import regexp.population.engine as engine

    base = compose_cfg(["trainer.epochs=1", "trainer.progress=false", "data.n_train=600", "optimizer=momentum",
                        "regularizer=[augmentation,adversarial,dropconnect]"])
    points = [{"model.width": 12, "regularizer.dropconnect.p": 0.2, "seed": 0},
              {"model.width": 16, "regularizer.dropconnect.p": 0.4, "seed": 1}]
    stacked = []
    real = engine._finish_completed
    monkeypatch.setattr(engine, "_finish_completed",
                        lambda b, k, *a: (stacked.append([w.detach().clone() for w in b.net.weights]),
                                          real(b, k, *a))[1])
    out = train_population(base, points, tmp_path, Options(exact_dropout=False))
    w_in, w_hidden, w_out = stacked[0]
    padded = [w_in[0, 12:], w_hidden[0, 12:], w_hidden[0, :, 12:], w_out[0, :, 12:]]
    assert all(torch.equal(t, torch.zeros_like(t)) for t in padded)
    assert all(m["status"] == "completed" and math.isfinite(m["final"]["train_loss"]) for m in out)


def test_refusals(compose_cfg):
    for regs in ("[augmentation,adversarial,dropconnect]", "[dropconnect,weight_noise]"):
        assert incompatibility(compose_cfg([f"regularizer={regs}"])) is None
    # SAM's second pass draws its own masks (tests/test_population_probes.py)
    assert incompatibility(compose_cfg(["optimizer=sam", "regularizer=[dropconnect]"])) is None


def test_interrupted_population_resumes_its_draws(compose_cfg, tmp_path, monkeypatch):
    """SIGTERM in the middle of epoch 2: each member's generator, from which its shifts, FGSM
    pass masks and DropConnect masks come, is in its checkpoint; the resumed population ends
    where each lone uninterrupted run ends (the stated tolerance)."""
    import math

    import regexp.population.engine as engine
    from regexp.data import load_data

    base = compose_cfg(BASE + ["optimizer=momentum", "regularizer=[augmentation,adversarial,dropconnect]",
                               "trainer.batch_size=100"])
    points = [{"model.width": 12, "regularizer.adversarial.eps": 0.2, "seed": 0},
              {"model.width": 16, "regularizer.dropconnect.p": 0.1, "seed": 1}]
    steps = math.ceil(len(load_data(base.data, 0).y_train) / 100)
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(steps + steps // 2 + 1))
    stopped = train_population(base, points, tmp_path / "pop")
    monkeypatch.undo()
    assert all(m["status"] == "interrupted" and m["epochs"] == 1 for m in stopped)
    resumed = train_population(base, points, tmp_path / "pop")
    for p, a in zip(points, resumed):
        b = train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True)
        assert a["status"] == b["status"] == "completed"
        wa, wb = (torch.load(tmp_path / d / point_name(p) / "model.pt", weights_only=True) for d in ("pop", "lone"))
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL)
