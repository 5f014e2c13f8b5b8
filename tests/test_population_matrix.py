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
}
# what a regularizer needs besides its own group to be composed at all
NEEDS = {"activity_kl": ["model.activation=sigmoid"]}


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
        vals = [c if ok(c) else next(a for a in (num(v / 2), num(3 * v / 2), v) if ok(a) and a != v or a == v)
                for c in vals]
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
        out[model] = {w: str(root / point_name(p)) for w, p in zip(setup["widths"], points)}
    return out


def _points(cfg, model: str, name: str, sources) -> List[Dict[str, Any]]:
    setup = MODEL_SETUP[model]
    points: List[Dict[str, Any]] = [{setup["width_key"]: w, "seed": 0} for w in setup["widths"]]
    for key, vals in _member_values(cfg, name).items():
        for p, v in zip(points, vals):
            p[key] = v
    if name == "transfer":  # a member key: each member starts from the run of its own width
        for p in points:
            p["regularizer.transfer.run_dir"] = sources[model][p[setup["width_key"]]]
    if name == "parameter_tying":  # not a member key: one reference, tied where names and shapes match
        for p in points:
            p["regularizer.parameter_tying.run_dir"] = sources[model][setup["widths"][1]]
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
    # members are not copies of each other: on the entries all have, their weights differ
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            a, b = states[i], states[j]
            assert any(not torch.equal(a[k][tuple(slice(0, n) for n in torch.minimum(
                torch.tensor(a[k].shape), torch.tensor(b[k].shape)).tolist())],
                b[k][tuple(slice(0, n) for n in torch.minimum(
                    torch.tensor(a[k].shape), torch.tensor(b[k].shape)).tolist())])
                for k in a if a[k].is_floating_point()), (points[i], points[j])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizer_x_model_trains_one_step_or_is_refused(compose_cfg, tmp_path, monkeypatch, sources,
                                                           model, name):
    setup = MODEL_SETUP[model]
    base = compose_cfg(TINY + setup["overrides"] + [f"regularizer=[{name}]"] + NEEDS.get(name, []))
    points = _points(base, model, name, sources)
    cfgs = [point_config(base, p) for p in points]
    why = incompatibility(cfgs[0])
    if why is not None:
        # one line naming what is refused; asked for a population, the sweep stops before training
        assert "\n" not in why and (name in why or "model" in why), why
        strict = compose_cfg(TINY + setup["overrides"] + [f"regularizer=[{name}]", "sweep.engine=population"]
                             + NEEDS.get(name, []))
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
    assert len(buckets) == 1 and len(buckets[0].members) == 3
    _check_padding(buckets[0])
    _check_members(tmp_path, points, metrics, cfgs)
