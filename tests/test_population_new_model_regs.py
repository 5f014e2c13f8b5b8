"""Regularizers written once for every stacked model: CNN, Transformer and GRU populations against
lone runs (augmentation and FGSM, dropout at each model's sites, early stopping, transfer with
and without freezing, parameter tying, soft weight sharing, masked reconstruction, multi-task
heads), and which regularizers each model trains or refuses. Weight draws, activity penalties
and the batch penalties: tests/test_population_model_draws.py.

Stated tolerance (as tests/test_population.py): every parameter of a member agrees with its
lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| (float32; only the summation order inside
the batched products differs), and every logged metric within a relative 1e-4.
"""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from regexp.population import use_population
from regexp.sweep import point_config, point_name
from test_population import BASE, _assert_same_run, _pop_and_lone

# per model: its config and three member sizes padded into one bucket (a repeated size lets a
# tied reference of that size match whole tensors)
SETUP: Dict[str, Dict[str, Any]] = {
    "cnn": {"overrides": ["data.n_train=600", "model=cnn_mnist1d"], "key": "model.channels",
            "sizes": [[4, 6, 5], [4, 6, 5], [8, 8, 8]]},
    # momentum, not Adam: Adam turns the key bias's exactly-zero gradient's rounding noise into
    # steps of size lr (see tests/test_population_transformer.py)
    "transformer": {"overrides": ["data.n_train=400", "model=transformer", "model.depth=1", "model.heads=2",
                                  "model.mlp_ratio=2.0"], "key": "model.embed_dim", "sizes": [8, 8, 12]},
    "gru": {"overrides": ["data.n_train=400", "model=gru"], "key": "model.hidden_size", "sizes": [4, 4, 6]},
}


def _points(model: str, per_member: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    setup = SETUP[model]
    points = [{setup["key"]: s, "seed": i} for i, s in enumerate(setup["sizes"])]
    for key, values in per_member.items():
        for p, v in zip(points, values):
            p[key] = v
    return points


def _check(compose_cfg, tmp_path, model: str, overrides: List[str], points, **tolerance) -> List[Dict]:
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, SETUP[model]["overrides"] + overrides, points)
    assert use_population(base, points)  # trained as one population, not fallen back to lone runs
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b, **tolerance)
    assert len({m["final"]["train_loss"] for m in pop}) == len(points)
    return pop


@pytest.mark.parametrize("model", SETUP)
def test_augmented_and_adversarial_batches_match_lone_runs(compose_cfg, tmp_path, model):
    # input noise, augmentation and FGSM in config order, each member with its own σ, shift,
    # scale and ε (ε = 0: its lone run skips the attack and draws nothing), lr and seed; FGSM's
    # input gradient runs through the stacked model's own forward, whose pass draws dropout
    # masks of its own before the training pass draws the step's
    points = _points(model, {"regularizer.input_noise.sigma": [0.05, 0.0, 0.1],
                             "regularizer.augmentation.shift": [3, 1, 0],
                             "regularizer.augmentation.scale": [0.1, 0.0, 0.2],
                             "regularizer.adversarial.eps": [0.1, 0.0, 0.05],
                             "regularizer.dropout.p": [0.2, 0.1, 0.0],
                             "optimizer.lr": [0.05, 0.02, 0.03]})
    _check(compose_cfg, tmp_path, model, ["optimizer=momentum",
                                          "regularizer=[input_noise,augmentation,adversarial,dropout]"], points)


@pytest.mark.parametrize("model", SETUP)
def test_dropout_members_draw_their_lone_runs_masks(compose_cfg, tmp_path, model):
    # each member's hidden and input p (p = 0: its lone run draws nothing there); the masks come
    # from each member's own generator in its lone run's order (a CNN: the input, then each
    # stage before its pooling; a Transformer: the input and the pooled features), laid over
    # the member's own units of the padded layout; Monte-Carlo dropout's report on its weights
    points = _points(model, {"regularizer.dropout.p": [0.3, 0.0, 0.5],
                             "regularizer.dropout.input_p": [0.1, 0.2, 0.0],
                             "optimizer.lr": [0.05, 0.02, 0.03]})
    pop = _check(compose_cfg, tmp_path, model, ["optimizer=momentum", "regularizer=[dropout]",
                                                "regularizer.dropout.mc_samples=2"], points)
    assert all("dropout/mc_test_acc" in m["extra"] for m in pop)


@pytest.mark.parametrize("model", SETUP)
def test_early_stopped_members_match_lone_runs(compose_cfg, tmp_path, model):
    # patience and the monitored metric differ, so members stop at their own epochs and the
    # others go on in the shrunken stacked tensors; each ends with its best weights restored
    points = _points(model, {"regularizer.early_stopping.patience": [1, 50, 1],
                             "regularizer.early_stopping.monitor": ["val_acc", "val_acc", "val_loss"],
                             "regularizer.early_stopping.min_delta": [0.0, 0.0, 0.05],
                             "optimizer.lr": [0.3, 0.1, 0.2]})
    pop = _check(compose_cfg, tmp_path, model, ["optimizer=momentum", "trainer.epochs=5",
                                                 "regularizer=[early_stopping]"], points)
    for p, m in zip(points, pop):
        final = torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)
        best = torch.load(tmp_path / "pop" / point_name(p) / "best_model.pt", weights_only=True)
        assert all(torch.equal(final[k], best[k]) for k in best) and m["final"]["epoch"] == m["best"]["epoch"]
    # the members left at different epochs (what exercises the shrinking)
    assert len({m["epochs"] for m in pop}) > 1, [m["epochs"] for m in pop]


@pytest.mark.parametrize("model", SETUP)
@pytest.mark.parametrize("freeze", [True, False])
def test_transfer_and_tying_members_match_lone_runs(compose_cfg, tmp_path, model, freeze):
    """Each member starts from a finished run of its own size (transfer), and is pulled toward
    one shared reference where its tensors' names and shapes match it (parameter tying; the
    member of another size matches the head's bias only). With ``freeze`` only the head trains:
    the frozen stacked tensors stay exactly at each member's start."""
    from regexp.train.trainer import train

    setup = SETUP[model]
    src = compose_cfg(BASE + setup["overrides"] + ["optimizer=sgd", "trainer.epochs=1"])
    runs = {}
    for i, size in enumerate(setup["sizes"][1:]):  # one source per distinct size
        runs[str(size)] = tmp_path / f"src{i}"
        train(point_config(src, {setup["key"]: size, "seed": 7 + i}), runs[str(size)], [], sweep=True)
    points = _points(model, {"regularizer.transfer.run_dir": [str(runs[str(s)]) for s in setup["sizes"]],
                             "regularizer.parameter_tying.lam": [0.1, 0.0, 0.05],
                             "optimizer.lr": [0.05, 0.02, 0.03]})
    pop = _check(compose_cfg, tmp_path, model, [
        "optimizer=momentum", "regularizer=[transfer,parameter_tying]", f"regularizer.transfer.freeze={freeze}",
        f"regularizer.parameter_tying.run_dir={runs[str(setup['sizes'][0])]}"], points)
    for p, m in zip(points, pop):
        start = torch.load(tmp_path / "pop" / point_name(p) / "init_model.pt", weights_only=True)
        source = torch.load(runs[str(p[setup["key"]])] / "model.pt", weights_only=True)
        assert all(torch.equal(start[k], source[k]) for k in source)  # the whole run loaded
        final = torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)
        assert [torch.equal(final[k], start[k]) for k in start] == [freeze and not k.startswith("head.")
                                                                   for k in start]


@pytest.mark.parametrize("model", SETUP)
def test_every_regularizer_trains_in_a_model_population_or_is_refused_in_one_line(compose_cfg, model):
    from regexp.population.compat import (MODEL_REGULARIZERS, NOT_FOR_MODEL, NOT_FOR_NEW_MODELS, NOT_STACKED,
                                          incompatibility)
    from regexp.regularizers.base import REGULARIZERS as ALL

    trains = set(MODEL_REGULARIZERS[model])
    refused = set(NOT_FOR_NEW_MODELS) | set(NOT_FOR_MODEL.get(model, {})) | set(NOT_STACKED)
    assert trains | refused == set(ALL) and not trains & refused
    for name in trains:
        assert incompatibility(compose_cfg(SETUP[model]["overrides"] + [f"regularizer=[{name}]"])) is None, name
    for name in refused - set(NOT_STACKED):
        why = incompatibility(compose_cfg(SETUP[model]["overrides"] + [f"regularizer=[{name}]"]))
        assert why.startswith(f"regularizer {name} with model={model} (") and "\n" not in why



@pytest.mark.parametrize("model", SETUP)
def test_soft_weight_sharing_members_match_lone_runs(compose_cfg, tmp_path, model):
    # each member's own learned mixture (its λ, its group's lr) over its real weights only
    points = _points(model, {"regularizer.soft_weight_sharing.tau": [0.5, 0.0, 1.0],
                             "regularizer.soft_weight_sharing.lr": [0.01, 0.003, 0.005],
                             "optimizer.lr": [0.05, 0.02, 0.03]})
    _check(compose_cfg, tmp_path, model, ["optimizer=momentum", "regularizer=[soft_weight_sharing]"], points)


@pytest.mark.parametrize("model", SETUP)
def test_masked_reconstruction_members_match_lone_runs(compose_cfg, tmp_path, model):
    # the reconstruction head (one output per position) replaces the classifier's in each lone
    # model and is stacked like it; each member hides its own segments (its generator, before
    # its dropout masks) and learns its masked MSE
    points = _points(model, {"regularizer.dropout.p": [0.1, 0.0, 0.2], "optimizer.lr": [0.05, 0.02, 0.03]})
    _check(compose_cfg, tmp_path, model, ["optimizer=momentum", "regularizer=[masked_reconstruction,dropout]"],
           points)

@pytest.mark.parametrize("model", SETUP)
def test_multi_task_members_match_lone_runs(compose_cfg, tmp_path, model):
    # each member's auxiliary head reads the features its output layer reads (a CNN's flattened
    # last stage, a Transformer's pooled embedding, after dropout), its columns where the
    # stacked model keeps that member's features, stepped with its own λ and lr
    points = _points(model, {"regularizer.multi_task.lam": [1.0, 0.0, 0.5], "regularizer.dropout.p": [0.1, 0.0, 0.2],
                             "optimizer.lr": [0.05, 0.02, 0.03]})
    _check(compose_cfg, tmp_path, model, ["optimizer=momentum", "regularizer=[dropout,multi_task]"], points)


@pytest.mark.parametrize("reg", ["multi_task", "soft_weight_sharing"])
@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_sam_members_ascend_their_heads_and_mixtures_as_lone_sam_runs(compose_cfg, tmp_path, model, reg):
    # the lone SAM ascends every group of its optimizer: the weights and multi_task's head (a
    # Transformer's on its scattered columns) or the learned mixture, under one norm per member
    own = ({"regularizer.multi_task.lam": [1.0, 0.0, 0.5]} if reg == "multi_task" else
           {"regularizer.soft_weight_sharing.tau": [0.5, 0.0, 1.0], "regularizer.soft_weight_sharing.lr": [0.01, 0.003, 0.005]})
    points = _points(model, {**own, "optimizer.rho": [0.1, 0.05, 0.2], "regularizer.dropout.p": [0.1, 0.0, 0.2]})
    _check(compose_cfg, tmp_path, model, ["optimizer=sam", "optimizer.base=momentum", "optimizer.lr=0.03",
                                          f"regularizer=[dropout,{reg}]"], points)
