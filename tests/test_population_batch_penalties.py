"""tangent_prop, gradient_norm_penalty and masked_reconstruction in a population, each written
once (``batch_penalty_of`` / ``masked_mse(stacked=True)``): a member equals its lone run, and the
stacked formula equals the lone one member by member.

Stated tolerances (float32): after 2 epochs (12 steps; SAM: 1 epoch, 6) every parameter of a member agrees with
its lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| and every logged metric within a
relative 1e-4 (``_assert_same_run``: only the summation order inside the batched products
differs; the double backward adds no other difference). Stacked against lone formulas on the
same weights: values and gradients within 1e-5 relative (float32) after padding a member.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import lone_batch
from regexp.errors import ConfigError
from regexp.models.mlp import MLP
from regexp.population import use_population
from regexp.population.compat import incompatibility
from regexp.population.pretext import MemberPretext
from regexp.population.stacked_mlp import StackedMLP
from regexp.regularizers import REGULARIZERS
from regexp.regularizers.base import Batch
from regexp.regularizers.masked_reconstruction import hide, masked_mse, segment_mask
from test_population import _assert_same_run, _pop_and_lone

SMALL = ["data.n_train=300", "trainer.batch_size=50"]
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------- stacked formula = lone formula
def _stacked_pair(widths=(5, 8), activation="tanh", depth=2):
    torch.manual_seed(0)
    models = [MLP(40, 10, w, depth, activation) for w in widths]
    return models, StackedMLP(models, list(widths), max(widths), activation, torch.device("cpu"))


def _stacked_batch(net: StackedMLP, x: torch.Tensor, y: torch.Tensor) -> Batch:
    def ce(logits, t):  # each member's mean cross-entropy, (M,)
        return F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none").view(t.shape).mean(1)

    xs = x.flatten(2)
    return Batch(xs, y, ce(net.forward(xs), y), net.forward, ce, net.params, (1, 40))


def _lone_value_and_grads(cls, model, hp, x, y):
    loss = F.cross_entropy(model(x), y)
    value = cls.batch_penalty_of(lone_batch(model, loss, x, y), hp, False)
    return value, torch.autograd.grad(value, list(model.parameters()), materialize_grads=True)


@pytest.mark.parametrize("name,hp", [
    ("tangent_prop", dict(tangents=["shift", "scale"], scale_step=0.05)),
    ("tangent_prop", dict(tangents=["scale"], scale_step=(0.05, 0.2))),  # each member its own δ
    ("gradient_norm_penalty", dict(mode="full", micro_batches=4)),
    ("gradient_norm_penalty", dict(mode="sgd", micro_batches=3)),
])
def test_stacked_batch_penalty_is_each_members_lone_penalty_values_and_gradients(name, hp):
    cls = REGULARIZERS[name]
    models, net = _stacked_pair()
    lam = torch.tensor([0.3, 0.05])
    x = torch.randn(2, 12, 1, 40)  # each member its own batch
    y = torch.randint(0, 10, (2, 12))
    per_member = {k: v for k, v in hp.items() if isinstance(v, tuple)}  # (M,) in the stack, one each alone
    stacked_hp = {**hp, **{k: torch.tensor(v) for k, v in per_member.items()}}
    pen = cls.batch_penalty_of(_stacked_batch(net, x, y), SimpleNamespace(lam=lam, **stacked_hp), True)
    assert pen.shape == (2,)
    # members are independent: the sum's gradient is each one's own (J·v has no head-bias term)
    grads = torch.autograd.grad(pen.sum(), net.params, materialize_grads=True)
    for m, model in enumerate(models):
        own = {**hp, **{k: v[m] for k, v in per_member.items()}}
        value, want = _lone_value_and_grads(cls, model, SimpleNamespace(lam=float(lam[m]), **own), x[m], y[m])
        assert pen[m].item() == pytest.approx(value.item(), rel=RTOL)
        got = net.member_state(m, list(grads))
        for (pname, _), w in zip(model.named_parameters(), want):
            torch.testing.assert_close(got[pname], w, rtol=RTOL, atol=ATOL)
    # the narrow member's padding gets exactly no gradient (it stays zero under every optimizer)
    assert torch.count_nonzero(grads[0][0, 5:]) == 0 and torch.count_nonzero(grads[2][0, 5:, :]) == 0
    assert torch.count_nonzero(grads[2][0, :, 5:]) == 0 and pen[1] > 0


def test_stacked_masked_mse_is_each_members_value_and_gradient():
    torch.manual_seed(1)
    target, pred = torch.randn(3, 6, 2, 10), torch.randn(3, 6, 20, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.stack([segment_mask(6, 10, 4, g) for _ in range(3)])
    got = masked_mse(pred, target, mask, True)
    (grad,) = torch.autograd.grad(got.sum(), pred)
    for m in range(3):
        p = pred.detach()[m].clone().requires_grad_()
        want = masked_mse(p, target[m], mask[m])
        want.backward()
        assert got[m].item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(grad[m], p.grad, rtol=1e-6, atol=1e-8)
        # by hand: Σ over the masked positions of both channels / (2 · 6 · 4)
        err = (p.detach().view(6, 2, 10) - target[m]).pow(2) * mask[m][:, None, :]
        assert want.item() == pytest.approx(err.sum().item() / (2 * 6 * 4), rel=1e-6)


def test_member_pretext_draws_each_lone_runs_segments_from_its_own_generator():
    members = [SimpleNamespace(dropout_gen=torch.Generator().manual_seed(s),
                               cfg=SimpleNamespace(regularizer={"masked_reconstruction": SimpleNamespace(
                                   segment=4, fill=f)})) for s, f in ((3, -1.0), (7, 0.5))]
    pre = MemberPretext.of(members, (2, 10), torch.device("cpu"))
    x = torch.randn(2, 5, 20)
    for step in range(2):  # successive steps go on with each member's stream
        hidden = pre.draw(x)
        for m, (seed, fill) in enumerate(((3, -1.0), (7, 0.5))):  # each its own fill value
            torch.manual_seed(seed)  # the lone run: the global generator from the member's state
            for _ in range(step + 1):
                want = segment_mask(5, 10, 4)
            assert torch.equal(pre.mask[m], want)
            assert torch.equal(hidden[m], hide(x[m].view(5, 2, 10), want, fill).view(5, 20))
    logits = torch.randn(2, 5, 20)
    assert torch.equal(pre.loss(logits), masked_mse(logits, x.view(2, 5, 2, 10), pre.mask, True))


# ---------------------------------------------------------------- a member equals its lone run
def test_tangent_prop_members_match_lone_runs_with_dropout(compose_cfg, tmp_path):
    """λ and width differ; the extra forward pass draws its own dropout masks from each member's
    generator, after the step's own, as the lone run's second pass does."""
    points = [{"model.width": 16, "regularizer.tangent_prop.lam": 0.05, "regularizer.tangent_prop.scale_step": 0.05,
               "seed": 0},
              {"model.width": 12, "regularizer.tangent_prop.lam": 0.5, "regularizer.tangent_prop.scale_step": 0.2,
               "seed": 1}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=adam", "regularizer=[tangent_prop,dropout]", "regularizer.dropout.p=0.2",
        "regularizer.tangent_prop.tangents=[shift,scale]", "model.activation=tanh"], points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert pop[0]["history"] != pop[1]["history"]


def test_tangent_prop_before_an_activity_penalty_leaves_it_the_steps_activations(compose_cfg, tmp_path):
    """tangent_prop's extra pass runs first; activity_kl must still read the step's own hidden
    activations, as the lone run's restored sites give it (sigmoid: firing rates as they are)."""
    points = [{"model.width": 16, "seed": 0}, {"model.width": 12, "seed": 1}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=adam", "regularizer=[tangent_prop,activity_kl]", "regularizer.activity_kl.alpha=0.1",
        "model.activation=sigmoid"], points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


@pytest.mark.parametrize("mode", ["full", "sgd"])
def test_gradient_norm_penalty_members_match_lone_runs(compose_cfg, tmp_path, mode):
    points = [{"model.width": 16, "regularizer.gradient_norm_penalty.lam": 0.1, "seed": 0},
              {"model.width": 10, "regularizer.gradient_norm_penalty.lam": 0.02, "seed": 1},
              {"model.width": 16, "regularizer.gradient_norm_penalty.lam": 0.0, "seed": 2}]
    extra = (["regularizer=[gradient_norm_penalty,label_smoothing]", "regularizer.label_smoothing.eps=0.1"]
             if mode == "full" else ["regularizer=[gradient_norm_penalty,dropout]", "regularizer.dropout.p=0.1",
                                     "regularizer.gradient_norm_penalty.micro_batches=3"])
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=momentum", f"regularizer.gradient_norm_penalty.mode={mode}"] + extra, points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


@pytest.mark.parametrize("penalty", [["regularizer.tangent_prop.lam=0.1"],
                                     ["regularizer.gradient_norm_penalty.mode=sgd",
                                      "regularizer.gradient_norm_penalty.micro_batches=3",
                                      "regularizer.gradient_norm_penalty.lam=0.05"]])
def test_extra_passes_draw_their_own_weight_noise_and_dropconnect_masks(compose_cfg, tmp_path, penalty):
    """Each extra forward pass (the tangent pass; the k micro-batch passes) perturbs the weights
    anew, layer by layer between its dropout masks, from each member's generator, as a lone
    run's pass does; σ and p differ per member (one member at σ = 0 and p = 0 still draws)."""
    name = penalty[0].split(".")[1]
    points = [{"model.width": 16, "regularizer.weight_noise.sigma": 0.05, "regularizer.dropconnect.p": 0.2, "seed": 0},
              {"model.width": 12, "regularizer.weight_noise.sigma": 0.0, "regularizer.dropconnect.p": 0.0, "seed": 1}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=momentum", f"regularizer=[{name},weight_noise,dropconnect,dropout]", "regularizer.dropout.p=0.1",
        "regularizer.weight_noise.include_head=false", "model.activation=tanh"] + penalty, points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


@pytest.mark.parametrize("regs", ["[masked_reconstruction,input_noise,dropout]",
                                  "[input_noise,masked_reconstruction,dropout]",
                                  "[augmentation,masked_reconstruction,input_noise,dropout]"])
def test_masked_reconstruction_members_match_lone_runs(compose_cfg, tmp_path, regs):
    """The head has C·L outputs, each member's segments are its lone run's draws, its loss the
    masked MSE and its report the lone run's. The batch transforms run in config order, as the
    lone step's ``transform_batch`` calls: listed after input noise (or augmentation), the
    segments are hidden in the noisy (augmented) batch, which is also the reconstruction's
    target, and drawn after the noise."""
    points = [{"model.width": 16, "optimizer.lr": 0.01, "regularizer.input_noise.sigma": 0.1, "seed": 0},
              {"model.width": 24, "optimizer.lr": 0.003, "regularizer.input_noise.sigma": 0.0, "seed": 1,
               "regularizer.masked_reconstruction.fill": -0.5}]  # each member its own fill value
    if "augmentation" in regs:  # each member its own shift
        points = [{**p, "regularizer.augmentation.shift": s} for p, s in zip(points, (2, 4))]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SMALL + [
        "optimizer=adam", f"regularizer={regs}", "regularizer.dropout.p=0.1",
        "regularizer.masked_reconstruction.segment=8"], points)
    assert incompatibility(base) is None and use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert 0 < pop[0]["extra"]["masked_reconstruction/test_mse"] != pop[1]["extra"]["masked_reconstruction/test_mse"]


# ---------------------------------------------------------------- what cannot join is refused
@pytest.mark.parametrize("regs,extra,why", [
    # joint parameter tying, refused here before, trains in a population (tests/test_population_joint_tying.py)
    ("[tangent_prop]", ["model=transformer"], "regularizer tangent_prop with model=transformer"),
])
def test_combinations_that_cannot_match_are_refused_in_one_line(compose_cfg, regs, extra, why):
    points = [{"seed": 0}, {"seed": 1}]
    cfg = compose_cfg([f"regularizer={regs}"] + extra)
    assert not use_population(cfg, points)
    with pytest.raises(ConfigError, match=why):
        use_population(compose_cfg([f"regularizer={regs}", "sweep.engine=population"] + extra), points)


@pytest.mark.parametrize("noise", [[], ["weight_noise"]])
def test_both_penalties_with_sam_in_the_member_by_member_form_match_lone_runs(compose_cfg, tmp_path, noise):
    """SAM's second pass recomputes both penalties (the tangent pass drawing its own masks, and
    weight noise, again), and the member-by-member forward (wide buckets on CPU) is
    differentiated twice the same way."""
    from regexp.population import Options, train_population
    from regexp.sweep import point_config, point_name
    from regexp.train.trainer import train
    from test_population import BASE

    regs = ",".join(["gradient_norm_penalty", "tangent_prop", "dropout"] + noise)
    base = compose_cfg(BASE + SMALL + [
        "trainer.epochs=1", "optimizer=sam", f"regularizer=[{regs}]", "regularizer.dropout.p=0.1",
        "model.activation=gelu"])
    points = [{"model.width": 12, "regularizer.tangent_prop.lam": 0.2, "regularizer.gradient_norm_penalty.lam": 0.01,
               "optimizer.rho": 0.05, "seed": 0},
              {"model.width": 8, "regularizer.tangent_prop.lam": 0.01, "regularizer.gradient_norm_penalty.lam": 0.1,
               "optimizer.rho": 0.1, "seed": 1}]
    assert use_population(base, points)
    pop = train_population(base, points, tmp_path / "pop", Options(loop_width=1))
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


def test_torch_compile_is_refused_with_a_double_backward_penalty(compose_cfg, tmp_path):
    from regexp.population import Options, train_population

    base = compose_cfg(SMALL + ["trainer.epochs=1", "trainer.progress=false", "regularizer=[tangent_prop]"])
    (res,) = train_population(base, [{"model.width": 8, "seed": 0}], tmp_path, Options(compile=True))
    assert res["status"] == "failed"  # the bucket's error, recorded on its member
    assert "extra.population.compile=true is invalid with tangent_prop" in res["error"]
