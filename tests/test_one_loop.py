"""One training loop: a lone run is a population of one member, trained by the code that trains
a sweep's population (regexp/population/engine.py). tests/test_population_reference.py checks
that loop against plain PyTorch; this file checks what a lone run adds around it: it is the
same computation as a one-point population sweep, it leaves the same files, a config no model
can train is refused before anything is written, a pruned run stops where its pruner says, and
an interrupted run goes on to the uninterrupted run's weights.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import StopAfter, read_scalars
from regexp.errors import ConfigError
from regexp.population import train_population
from regexp.population.run import LONE_RUN
from regexp.sweep import point_config, point_name
from regexp.train.trainer import train

BASE = ["trainer.epochs=2", "trainer.progress=false", "trainer.threads=1", "data.n_train=600",
        "logger.histogram_every=1"]
# keys whose values differ between a lone run and a sweep's point by design or by the clock
OWN = {"wall_s", "engine_reason", "overrides", "config", "population_tuning", "threads_reason"}


@pytest.mark.parametrize("overrides", [
    ["regularizer=[dropout,weight_decay]", "optimizer=adam", "scheduler=cosine"],
    # no epoch improves val_loss by 1.0: stopped after epoch 2, epoch 1's weights restored
    ["regularizer=[early_stopping]", "optimizer=sgd", "regularizer.early_stopping.patience=1", "trainer.epochs=4",
     "regularizer.early_stopping.monitor=val_loss", "regularizer.early_stopping.min_delta=1.0"],
    ["regularizer=[label_smoothing]", "optimizer=momentum", "trainer.grad_clip=0.5"],
], ids=["dropout-decay-adam-cosine", "early-stopping", "smoothing-momentum-clip"])
def test_a_lone_run_is_a_one_point_population_bit_for_bit(compose_cfg, tmp_path, overrides):
    """The same member, seed and loop: weights, metrics and TensorBoard scalars equal exactly."""
    lone = train(compose_cfg(BASE + overrides), tmp_path / "lone", [])
    base = compose_cfg(BASE + overrides)
    point = {"seed": 0}
    (swept,) = train_population(base, [point], tmp_path / "sweep")
    pdir = tmp_path / "sweep" / point_name(point)
    assert lone["engine"] == swept["engine"] == "population"
    assert lone["engine_reason"] == LONE_RUN["engine_reason"] and swept["engine_reason"] == "a sweep's population"
    assert list(lone) == list(swept)
    for k in set(lone) - OWN:
        assert lone[k] == swept[k], k
    assert lone["config"] == OmegaConf.to_container(point_config(base, point), resolve=True)
    for f in ("model.pt", "best_model.pt", "init_model.pt", "checkpoint.pt"):
        a, b = (torch.load(d / f, weights_only=True) for d in (tmp_path / "lone", pdir))
        if f == "checkpoint.pt":
            a, b = a["model"], b["model"]
        assert a.keys() == b.keys(), f
        for k in b:
            assert torch.equal(a[k], b[k]), (f, k)
    sl, sp = read_scalars(tmp_path / "lone"), read_scalars(pdir)
    assert sl == sp
    files = {p.name for p in (tmp_path / "lone").iterdir() if not p.name.startswith("events")}
    assert files == {p.name for p in pdir.iterdir() if not p.name.startswith("events")}
    assert lone.get("stopped_epoch") == (2 if "early" in str(overrides) else None)


def test_a_config_no_model_can_train_is_refused_before_anything_is_written(compose_cfg, tmp_path):
    cfg = compose_cfg(BASE + ["model=transformer", "regularizer=[tangent_prop]"])
    with pytest.raises(ConfigError, match="regularizer tangent_prop with model=transformer"):
        train(cfg, tmp_path / "r", [])
    assert not (tmp_path / "r").exists()
    # an ensemble beside a regularizer it cannot stack with: refused alike, with its reason
    cfg = compose_cfg(BASE + ["regularizer=[ensemble,multi_task]"])
    with pytest.raises(ConfigError, match="regularizer multi_task with ensemble"):
        train(cfg, tmp_path / "e", [])
    assert not (tmp_path / "e").exists()
    m = train(compose_cfg(BASE + ["trainer.epochs=1"]), tmp_path / "a", [])
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["engine"] == m["engine"] == "population"


def test_trainer_engine_is_no_longer_a_key(compose_cfg):
    from regexp.config import validate

    with pytest.raises(ConfigError, match="trainer.engine"):
        validate(compose_cfg(["+trainer.engine=trainer"]))


@pytest.mark.parametrize("over", [["optimizer=adam", "regularizer=[weight_decay,dropout]"],
                                  ["model=cnn_mnist1d", "model.norm=batch", "optimizer=momentum"]],
                         ids=["mlp-dropout", "cnn-batch-norm"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_weights_exactly(compose_cfg, tmp_path, monkeypatch, over):
    """SIGTERM in the middle of epoch 2; the resumed run ends with the uninterrupted run's
    weights, bit for bit (dropout's generator and batch norm's running statistics included)."""
    import regexp.population.engine as engine
    from regexp.data import load_data

    over = over + ["trainer.epochs=3"]
    ref = train(compose_cfg(BASE + over), tmp_path / "ref", [])
    steps = math.ceil(len(load_data(compose_cfg(BASE).data, 0).y_train) / 100)
    # the loop asks once per step and once after each epoch's end: stop in the middle of epoch 2
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(steps + 3))
    m = train(compose_cfg(BASE + over), tmp_path / "run", [])
    assert m["status"] == "interrupted"
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and 0 < ck["step_in_epoch"] < steps
    monkeypatch.undo()
    m = train(compose_cfg(BASE + over + ["trainer.resume=true"]), tmp_path / "run", [])
    assert m["status"] == "completed"
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("run", "ref"))
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert m["history"] == ref["history"]


def _prune_at(epoch: int, seen: list):
    """A search's pruner as train() calls it: True stops the run after ``epoch``."""
    def on_epoch(row):
        seen.append(dict(row))
        return row["epoch"] >= epoch
    return on_epoch


@pytest.mark.parametrize("overrides", [
    ["optimizer=adam", "regularizer=[dropout]", "probe=[sharpness]", "probe.every=1", "probe.batch_size=64",
     "probe.sharpness.samples=2", "probe.sharpness.noise_microbatches=2"],
    # early stopping would stop at epoch 2 too (see above): the pruner's stop is the one recorded
    ["regularizer=[early_stopping]", "optimizer=sgd", "regularizer.early_stopping.patience=1",
     "regularizer.early_stopping.monitor=val_loss", "regularizer.early_stopping.min_delta=1.0"],
], ids=["adam-dropout-probes", "early-stopping"])
def test_a_pruned_run_stops_where_its_pruner_says_and_goes_on_later(compose_cfg, tmp_path, overrides):
    """train()'s on_epoch (a search's pruner) sees each evaluated row; pruned after epoch 2 of 4,
    the run leaves status pruned, pruned_epoch, no final weights or probes, the periodic probes
    before that epoch only, and a checkpoint (status pruned) that a later launch goes on from
    to the weights of a run never pruned."""
    cfg = compose_cfg(BASE + overrides + ["trainer.epochs=4"])
    seen: list = []
    m = train(cfg, tmp_path / "run", [], on_epoch=_prune_at(2, seen))
    assert [r["epoch"] for r in seen] == [1, 2] and seen == m["history"]
    assert m["status"] == "pruned" and m["pruned_epoch"] == 2 and "stopped_epoch" not in m
    files = {p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith("events")}
    assert "model.pt" not in files and "checkpoint.pt" in files
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ck["status"], ck["epoch"], ck["step_in_epoch"]) == ("pruned", 2, 0)
    if "probe=[sharpness]" in overrides:  # the periodic probe of the pruned epoch is skipped, not drawn
        assert [r["epoch"] for r in m["probe_history"]] == [1] and m["probes"] == {}
    scalars = read_scalars(tmp_path / "run")
    assert [s for s, _ in scalars["acc/test"]] == [1, 2]
    if "regularizer=[early_stopping]" in overrides:
        return  # its own stop at epoch 2 was not recorded: a later launch trains on (the pruner's stop stands)
    # a later launch goes on from the pruned checkpoint to the never-pruned run's weights
    ref = train(cfg, tmp_path / "ref", [])
    done = train(compose_cfg(BASE + overrides + ["trainer.epochs=4", "trainer.resume=true"]), tmp_path / "run", [])
    assert done["status"] == ref["status"] and done["history"] == ref["history"]
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("run", "ref"))
    for k in b:
        assert torch.equal(a[k], b[k]), k
