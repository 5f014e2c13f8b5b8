"""The MLP population's draws and recorded activations on CNN, Transformer and GRU members, against
lone runs: weight noise and DropConnect on each member's block of the stacked weights, the
activity penalties on each model's own sites, the double-backward batch penalties (CNN, GRU),
and the batched (GPU) draws keeping padding zero.

Stated tolerance (as tests/test_population.py): every parameter of a member agrees with its
lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| (float32; only the summation order inside
the batched products differs), and every logged metric within a relative 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from test_population import BASE
from test_population_new_model_regs import SETUP, _check, _points


@pytest.mark.parametrize("model,layout", [("cnn", []), ("cnn", ["model=cnn", "model.pool=max", "model.kernel_size=3"]),
                                          ("transformer", [])])
def test_weight_noise_and_dropconnect_members_match_lone_runs(compose_cfg, tmp_path, model, layout):
    # each member's σ and DropConnect p drawn on its own lone weights inside its stacked slice
    # (a CNN's (C_out, C_in, k) kernels and its head, flatten: C·positions columns, gap: C; a
    # Transformer's patch embedding, MLP and head, laid out head by head), in its lone run's
    # order: before each weight the dropout site feeding it, then DropConnect's mask and the
    # noise, as attached (DropConnect listed first)
    sizes = [[3, 5], [3, 5], [6, 4]] if layout else SETUP[model]["sizes"]
    points = [{SETUP[model]["key"]: c, "seed": i, "regularizer.weight_noise.sigma": s, "regularizer.dropconnect.p": p,
               "regularizer.dropout.p": d, "optimizer.lr": lr}
              for i, (c, s, p, d, lr) in enumerate(zip(sizes, [0.02, 0.0, 0.05], [0.2, 0.3, 0.0], [0.1, 0.0, 0.2],
                                                       [0.05, 0.02, 0.03]))]
    # The weights agree within the stated 1e-5 everywhere. The momentum buffers of the max-pooled
    # ReLU layout, an average of recent gradients, agree to 2.3e-4 (relative 2.6e-3) on one thread
    # of the AVX2 EPYC (the AVX-512 Xeon: within 1e-5): the grouped and the lone convolution round
    # differently, and where a pre-activation or a window's two values are that close, ReLU's
    # kink or the pooling's choice falls the other way, so that step's gradient differs by more
    # than rounding (the same layout with GELU, or with average pooling, stays within 1e-5
    # there): compared at 5e-4 for that layout
    _check(compose_cfg, tmp_path, model, [*layout, "optimizer=momentum", "regularizer=[dropconnect,weight_noise,dropout]",
                                          "regularizer.weight_noise.include_head=true"], points,
           state_atol=5e-4 if layout else 1e-5)


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_sam_members_with_weight_draws_match_lone_sam_runs(compose_cfg, tmp_path, model):
    # SAM's second pass draws each member's DropConnect masks, weight noise and dropout masks
    # again, in the lone order, on its block of the ascended weights; radii differ
    points = _points(model, {"regularizer.weight_noise.sigma": [0.02, 0.0, 0.05], "regularizer.dropconnect.p": [0.2, 0.3, 0.0],
                             "regularizer.dropout.p": [0.1, 0.0, 0.2], "optimizer.rho": [0.05, 0.1, 0.02]})
    _check(compose_cfg, tmp_path, model, ["optimizer=sam", "optimizer.base=momentum", "optimizer.lr=0.03",
                                          "regularizer=[dropconnect,weight_noise,dropout]",
                                          "regularizer.weight_noise.include_head=true"], points)


@pytest.mark.parametrize("model", SETUP)
def test_activity_penalty_members_match_lone_runs(compose_cfg, tmp_path, model):
    # each member's α and γ on its own recorded sites after dropout (a CNN: every stage's
    # (C, L) before pooling; a Transformer: the pooled features), padded units left out
    points = _points(model, {"regularizer.activity_l1.alpha": [0.01, 0.0, 0.02],
                             "regularizer.activity_student_t.alpha": [0.02, 0.01, 0.0],
                             "regularizer.activity_student_t.gamma": [1.0, 2.0, 0.5],
                             "regularizer.dropout.p": [0.1, 0.0, 0.2], "optimizer.lr": [0.05, 0.02, 0.03]})
    _check(compose_cfg, tmp_path, model, ["optimizer=momentum", "regularizer=[dropout,activity_l1,activity_student_t]"],
           points)


def test_cnn_activity_kl_members_match_lone_runs(compose_cfg, tmp_path):
    # sigmoid: a padded channel's rate would be 0 (act(0) is masked), adding KL(ρ ‖ 0) but for
    # each stage's own unit mask. (Not relu: a position that fires for almost no example has
    # ρ̂ near 0, where the KL's gradient ρ/ρ̂ amplifies the grouped convolution's rounding in
    # the pre-activations beyond the tolerance; a population of one, whose convolution sums in
    # the lone order, agrees to 1e-7.)
    points = _points("cnn", {"regularizer.activity_kl.alpha": [0.01, 0.0, 0.02],
                             "regularizer.activity_kl.rho": [0.05, 0.1, 0.2], "optimizer.lr": [0.05, 0.02, 0.03]})
    _check(compose_cfg, tmp_path, "cnn", ["optimizer=momentum", "model.activation=sigmoid",
                                          "regularizer=[activity_kl]"], points)


@pytest.mark.parametrize("reg,mode", [("tangent_prop", None), ("gradient_norm_penalty", "sgd"),
                                      ("gradient_norm_penalty", "full")])
@pytest.mark.parametrize("model", ["cnn", "gru", "cnn+weight_noise"])
def test_double_backward_penalties_match_lone_runs(compose_cfg, tmp_path, reg, mode, model):
    # the penalty's extra pass (tangent_prop's input derivative, the micro-batches' gradient
    # norms) runs through the stacked grouped convolutions (a GRU: its stacked recurrence),
    # each member with its own λ; its
    # extra pass draws fresh dropout masks (and weight noise: each member's σ on its kernels),
    # as the lone run's does, and leaves the step's recorded features to multi_task's heads,
    # listed after it
    model, noised = model.split("+")[0], model.endswith("+weight_noise")
    points = _points(model, {f"regularizer.{reg}.lam": [0.01, 0.0, 0.02], "regularizer.dropout.p": [0.1, 0.2, 0.0],
                             "regularizer.multi_task.lam": [0.5, 1.0, 0.0], "optimizer.lr": [0.05, 0.02, 0.03],
                             **({"regularizer.weight_noise.sigma": [0.03, 0.0, 0.05]} if noised else {})})
    extra = [f"regularizer.{reg}.mode={mode}"] if mode else []
    regs = ",".join(["dropout", reg, "multi_task"] + (["weight_noise"] if noised else []))
    _check(compose_cfg, tmp_path, model, ["optimizer=momentum", f"regularizer=[{regs}]", *extra], points)


@pytest.mark.parametrize("model,opt", [*((m, "momentum") for m in SETUP), ("cnn", "sam"), ("transformer", "sam")])
def test_batched_draws_keep_padding_zero(compose_cfg, tmp_path, monkeypatch, model, opt):
    """The GPU mode (one call draws every member's dropout masks, weight noise and DropConnect
    masks: the lone runs' distributions, not their numbers), run on the CPU: the padded
    entries of every stacked tensor (a Transformer's between its members' head-by-head units)
    end exactly 0 and the members train to finite losses other than the exact mode's. A GRU
    takes no weight draws (a lone GRU run refuses them): its dropout masks alone. SAM: its
    ascent and its second pass's draws leave the padding 0 too."""
    import math

    import regexp.population.engine as engine
    from regexp.population import Options, train_population

    draws = ["regularizer=[dropout]"] if model == "gru" else [
        "regularizer=[dropout,dropconnect,weight_noise]", "regularizer.weight_noise.sigma=0.05",
        "regularizer.weight_noise.include_head=true"]
    sam = ["optimizer.base=momentum", "optimizer.lr=0.03"] if opt == "sam" else []
    base = compose_cfg(BASE + SETUP[model]["overrides"] + [f"optimizer={opt}", *sam, "trainer.epochs=1", *draws])
    points = _points(model, {})
    ends = []
    real = engine._finish_completed
    monkeypatch.setattr(engine, "_finish_completed",
                        lambda b, k, *a: (ends.append((b.net.param_masks(), [p.detach().clone() for p in b.net.params])),
                                          real(b, k, *a))[1])
    batched = train_population(base, points, tmp_path / "batched", Options(exact_dropout=False))
    masks, params = ends[0]
    assert any((~keep).any() for keep in masks)
    for keep, p in zip(masks, params):
        assert torch.equal(p[~keep], torch.zeros_like(p[~keep]))
    exact = train_population(base, points, tmp_path / "exact", Options(exact_dropout=True))
    for a, b in zip(batched, exact):
        assert a["status"] == "completed" and math.isfinite(a["final"]["train_loss"])
        assert a["final"]["train_loss"] != b["final"]["train_loss"]
