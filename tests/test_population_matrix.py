"""Every registered regularizer x every model the population trains: a population of three
members that differ in width and in each numeric hyperparameter the regularizer lets members
differ in (``compat.MEMBER_KEYS``) trains one full-batch step, or is refused with one line.

After that step each member's folder is complete and its own, and the bucket's padded entries
(the rows and columns a narrower member does not have) hold exactly 0 with an exactly 0
gradient. A combination the population cannot train must be refused before anything trains.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from conftest import train_with_and_without
import regexp.population.engine as engine
from regexp.data import load_data
from regexp.errors import ConfigError
from regexp.population import train_population, use_population
from regexp.population.compat import MEMBER_KEYS, MODELS, incompatibility
from regexp.regularizers.base import REGULARIZERS
from regexp.sweep import point_config, point_job, point_name
from regexp.train.trainer import build_initial_model

# one full-batch step on 60 examples, evaluated once at its end
TINY = ["trainer.epochs=1", "trainer.progress=false", "trainer.threads=1", "data.n_train=60",
        "data.n_test=40", "trainer.batch_size=full", "trainer.eval_batch_size=64",
        "logger.histogram_every=0", "optimizer=sgd", "optimizer.lr=0.1"]
# per model: its config and the key members differ in width by (three widths of one bucket)
MODEL_SETUP: Dict[str, Dict[str, Any]] = {
    "mlp": {"overrides": ["model=mlp", "model.depth=2"], "width_key": "model.width", "widths": [3, 5, 8]},
    "cnn": {"overrides": ["model=cnn_mnist1d"], "width_key": "model.channels",
            "widths": [[2, 2, 2], [3, 3, 3], [4, 4, 4]]},
    "transformer": {"overrides": ["model=transformer", "model.heads=2"], "width_key": "model.embed_dim",
                    "widths": [4, 6, 8]},
    "gru": {"overrides": ["model=gru"], "width_key": "model.hidden_size", "widths": [3, 5, 8]},
}
# settings beside a regularizer's own group: activity_kl takes relu or sigmoid, and relu (the
# default) is what the others train with; multi_task needs MNIST-1D, the default data
NEEDS = {"activity_kl": ["model.activation=sigmoid"]}


def _needs(name: str, model: str):
    """``NEEDS`` where the model has the key (a transformer's activation is fixed: gelu; a GRU's
    are its gates')."""
    return [] if model in ("transformer", "gru") else NEEDS.get(name, [])


def _member_values(cfg, name: str) -> Dict[str, List[Any]]:
    """Three values of each numeric member key of regularizer ``name``: 0, v, 2v (off, on,
    doubled); where the regularizer's ranges refuse one, v/2 or 3v/2 instead."""
    out: Dict[str, List[Any]] = {}
    for key in MEMBER_KEYS:
        if not key.startswith(f"regularizer.{name}."):
            continue
        leaf = key.rsplit(".", 1)[1]
        v = cfg.regularizer[name].get(leaf)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # the transfer sources (set per member below) and the monitored metric
        ok = REGULARIZERS[name].ranges.get(leaf, (lambda _: True, ""))[0]
        num = type(v)
        vals = [num(0), v, num(2 * v)] if v else [num(0), num(0.05), num(0.1)]
        vals = [c if ok(c) else next(a for a in (num(v / 2), num(3 * v / 2), v) if ok(a)) for c in vals]
        out[key] = vals
    return out


@pytest.fixture(scope="module")
def sources(compose_cfg, tmp_path_factory) -> Dict[str, Dict[int, str]]:
    """Finished runs for transfer and parameter tying: per model, one per member width (a
    member loads the tensors of its own shape), trained once for the whole module."""
    out: Dict[str, Dict[int, str]] = {}
    for model in MODELS:
        setup = MODEL_SETUP[model]
        base = compose_cfg(TINY + setup["overrides"])
        root = tmp_path_factory.mktemp(f"source_{model}")
        points = [{setup["width_key"]: w} for w in setup["widths"]]
        done = train_population(base, points, root)
        assert [m["status"] for m in done] == ["completed"] * len(points)
        out[model] = {str(w): str(root / point_name(p)) for w, p in zip(setup["widths"], points)}
    return out


def _points(cfg, model: str, name: str, sources) -> List[Dict[str, Any]]:
    setup = MODEL_SETUP[model]
    points: List[Dict[str, Any]] = [{setup["width_key"]: w, "seed": 0} for w in setup["widths"]]
    for key, vals in _member_values(cfg, name).items():
        for p, v in zip(points, vals):
            p[key] = v
    if name == "transfer":  # a member key: each member starts from the run of its own width
        for p in points:
            p["regularizer.transfer.run_dir"] = sources[model][str(p[setup["width_key"]])]
    if name == "parameter_tying":  # not a member key: one reference, tied where names and shapes match
        for p in points:
            p["regularizer.parameter_tying.run_dir"] = sources[model][str(setup["widths"][1])]
    return points


def _lone_shapes(cfg) -> Dict[str, torch.Size]:
    """The state dict a lone run of ``cfg`` saves: its model built and attached as train() does."""
    data = load_data(cfg.data, int(cfg.seed))
    model, _, regs = build_initial_model(cfg, data, torch.device("cpu"), None)
    for r in regs:
        r.attach(model)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_padding(bucket) -> None:
    """Padded entries of every stacked tensor are exactly 0, and so is their last gradient."""
    net = bucket.net
    masks = net.param_masks()
    assert masks is not None, "members of differing widths must be padded"
    assert any((~real).any() for real in masks)
    grads = 0
    for p, real in zip(net.params, masks):
        pad = ~real
        assert torch.equal(p.detach()[pad], torch.zeros_like(p.detach()[pad]))
        if p.grad is not None:
            grads += 1
            assert torch.equal(p.grad[pad], torch.zeros_like(p.grad[pad]))
    assert grads > 0  # the last step's gradients are still there to check


def _check_members(out: Path, points, metrics, cfgs) -> None:
    names = [point_name(p) for p in points]
    assert len(set(names)) == len(points)
    states = []
    for p, m, cfg, name in zip(points, metrics, cfgs, names):
        d = out / name
        on_disk = json.loads((d / "metrics.json").read_text())
        assert on_disk["status"] == m["status"] == "completed", m.get("error")
        assert len(on_disk["history"]) == 1 and on_disk["history"][0]["epoch"] == 1
        assert on_disk["overrides"] == point_job(p, out)[1]  # its own point's values
        assert len(list(d.glob("events.out.tfevents.*"))) == 1
        state = torch.load(d / "model.pt", weights_only=True)
        lone = _lone_shapes(cfg)
        assert {k: v.shape for k, v in state.items()} == lone  # the lone model's keys and shapes
        init = torch.load(d / "init_model.pt", weights_only=True)
        assert any(not torch.equal(state[k], init[k]) for k in state)  # it took its step
        states.append(state)
    # each history is its member's own: no two report the same training loss
    assert len({m["history"][0]["train_loss"] for m in metrics}) == len(metrics)
    # members are not copies of each other: on the entries all have, their weights differ
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            assert any(not torch.equal(*_common(states[i][k], states[j][k])) for k in states[i]
                       if states[i][k].is_floating_point()), (points[i], points[j])


def _common(a: torch.Tensor, b: torch.Tensor):
    """The leading block two members' tensors of one name both have (widths differ)."""
    block = tuple(slice(0, min(n, m)) for n, m in zip(a.shape, b.shape))
    return a[block], b[block]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizer_x_model_trains_one_step_or_is_refused(compose_cfg, tmp_path, monkeypatch, sources,
                                                           model, name):
    setup = MODEL_SETUP[model]
    base = compose_cfg(TINY + setup["overrides"] + [f"regularizer=[{name}]"] + _needs(name, model))
    points = _points(base, model, name, sources)
    cfgs = [point_config(base, p) for p in points]
    why = incompatibility(cfgs[0])
    if why is not None:
        # one line naming what is refused; asked for a population, the sweep stops before training
        assert "\n" not in why and (name in why or "model" in why), why
        strict = compose_cfg(TINY + setup["overrides"] + [f"regularizer=[{name}]", "sweep.engine=population"]
                             + _needs(name, model))
        with pytest.raises(ConfigError, match="population"):
            use_population(strict, points)
        assert not use_population(base, points)  # auto trains it alone, never as a population
        return
    assert all(incompatibility(c) is None for c in cfgs)
    buckets = []

    class Recorded(engine.Bucket):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            buckets.append(self)

    monkeypatch.setattr(engine, "Bucket", Recorded)
    metrics = train_population(base, points, tmp_path)
    assert [m["status"] for m in metrics] == ["completed"] * 3, [m.get("error") for m in metrics]
    # an ensemble's K models are K members (slices) of the bucket (regexp/population/ensemble.py)
    k = int(base.regularizer.ensemble.components) if name == "ensemble" else 1
    assert len(buckets) == 1 and len(buckets[0].members) == 3 * k
    _check_padding(buckets[0])
    _check_members(tmp_path, points, metrics, cfgs)


def _weights(out: Path, point) -> Dict[str, torch.Tensor]:
    return torch.load(out / point_name(point) / "model.pt", weights_only=True)


@pytest.mark.parametrize("case", ["diverged", "stopped"])
def test_a_member_leaving_early_changes_nothing_for_the_others(compose_cfg, tmp_path, case):
    """Members are independent: a member that diverges (a huge lr) or stops early (patience 1)
    and leaves the stacked state mid-run leaves the others' weights and records bit-equal
    (atol=0) to a population trained without it. It is no wider than the others, so the
    bucket's padded width, and with it every product's shape, is the same in both."""
    overrides = ["trainer.epochs=4", "trainer.progress=false", "trainer.threads=1", "data.n_train=200",
                 "data.n_test=100", "trainer.batch_size=50", "logger.histogram_every=0", "optimizer=momentum",
                 "optimizer.lr=0.2", "regularizer=[early_stopping]", "regularizer.early_stopping.patience=100"]
    others = [{"model.width": 6, "seed": 0}, {"model.width": 10, "seed": 1, "optimizer.lr": 0.05}]
    leaver = ({"model.width": 8, "seed": 2, "optimizer.lr": 1e6} if case == "diverged" else
              {"model.width": 8, "seed": 2, "regularizer.early_stopping.patience": 1,
               "regularizer.early_stopping.monitor": "val_loss", "regularizer.early_stopping.min_delta": 10.0})
    base = compose_cfg(overrides)
    with_it, without = train_with_and_without(base, others, leaver, tmp_path, case)
    for p, a, b in zip(others, [with_it[0], with_it[2]], without):
        assert a["status"] == b["status"] == "completed" and a.get("stopped_epoch") is None
        assert a["history"] == b["history"] and a["best"] == b["best"] and a["final"] == b["final"]
        wa, wb = _weights(tmp_path / "with", p), _weights(tmp_path / "without", p)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb)
