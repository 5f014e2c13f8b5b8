"""A lone run trained as a population of one (trainer.engine=population) against the trainer's
loop (trainer.engine=trainer): the same weights, metrics.json and TensorBoard run.

Stated tolerance, as tests/test_population.py states it for members: after 2-3 epochs every
parameter agrees within |a - b| <= 1e-5 + 1e-4·|b| (float32; only the summation order inside
the batched matrix products differs), and every logged metric within a relative 1e-4 (1e-3 for
TensorBoard scalars).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import StopAfter, read_scalars
from regexp.errors import ConfigError
from regexp.train.trainer import train

ATOL, RTOL = 1e-5, 1e-4
BASE = ["trainer.epochs=2", "trainer.progress=false", "trainer.threads=1", "data.n_train=600",
        "logger.histogram_every=1"]
# keys whose values differ between engines by design or by the clock
OWN = {"wall_s", "engine", "engine_reason", "config"}


def _both(compose_cfg, tmp_path: Path, overrides):
    runs = {}
    for engine in ("trainer", "population"):
        cfg = compose_cfg(BASE + overrides + [f"trainer.engine={engine}"])
        runs[engine] = train(cfg, tmp_path / engine, [])
    return runs["population"], runs["trainer"]


def _assert_same(tmp_path: Path, pop, lone):
    assert (pop["engine"], lone["engine"]) == ("population", "trainer")
    # the same keys, in the same order; the population's also says how its step was computed
    assert [k for k in pop if k != "population_tuning"] == list(lone) and "population_tuning" in pop
    for f in ("model.pt", "best_model.pt", "init_model.pt"):
        a, b = (torch.load(tmp_path / d / f, weights_only=True) for d in ("population", "trainer"))
        assert a.keys() == b.keys(), f
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL)
    for k in set(lone) - OWN - {"history", "final", "best", "extra"}:
        assert pop[k] == lone[k], k
    assert {k: v for k, v in pop["config"].items() if k != "trainer"} == \
        {k: v for k, v in lone["config"].items() if k != "trainer"}
    assert len(pop["history"]) == len(lone["history"])
    for rp, rl in zip(pop["history"] + [pop["final"], pop["best"]], lone["history"] + [lone["final"], lone["best"]]):
        assert rp.keys() == rl.keys()
        for k in rl:
            assert rp[k] == pytest.approx(rl[k], rel=RTOL, abs=1e-6), k
    assert pop["extra"].keys() == lone["extra"].keys()
    sp, sl = read_scalars(tmp_path / "population"), read_scalars(tmp_path / "trainer")
    assert set(sp) == set(sl)
    for tag in sl:
        assert [s for s, _ in sp[tag]] == [s for s, _ in sl[tag]], tag
        assert [v for _, v in sp[tag]] == pytest.approx([v for _, v in sl[tag]], rel=1e-3, abs=1e-6), tag
    files = {p.name for p in (tmp_path / "trainer").iterdir() if not p.name.startswith("events")}
    assert files == {p.name for p in (tmp_path / "population").iterdir() if not p.name.startswith("events")}


@pytest.mark.parametrize("overrides", [
    ["regularizer=[dropout,weight_decay]", "optimizer=adam", "scheduler=cosine"],
    # no epoch improves val_loss by 1.0: stopped after epoch 2, epoch 1's weights restored
    ["regularizer=[early_stopping]", "optimizer=sgd", "regularizer.early_stopping.patience=1", "trainer.epochs=4",
     "regularizer.early_stopping.monitor=val_loss", "regularizer.early_stopping.min_delta=1.0"],
    ["regularizer=[label_smoothing]", "optimizer=momentum", "trainer.grad_clip=0.5"],
], ids=["dropout-decay-adam-cosine", "early-stopping", "smoothing-momentum-clip"])
def test_population_of_one_equals_the_trainer(compose_cfg, tmp_path, overrides):
    pop, lone = _both(compose_cfg, tmp_path, overrides)
    _assert_same(tmp_path, pop, lone)
    assert pop.get("stopped_epoch") == lone.get("stopped_epoch") == (2 if "early" in str(overrides) else None)


def test_auto_chooses_the_population_and_says_why(compose_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="regexp"):
        m = train(compose_cfg(BASE + ["trainer.epochs=1"]), tmp_path / "a", [])
    assert m["engine"] == "population"
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["engine"] == "population"
    assert any("trainer.engine=auto" in r.getMessage() and "population" in r.getMessage() for r in caplog.records)
    # an ensemble trains in the population too (its K models as K stacked slices)
    m = train(compose_cfg(BASE + ["trainer.epochs=1", "regularizer=[ensemble]"]), tmp_path / "e", [])
    assert m["engine"] == "population"
    # a combination the population does not support trains in the trainer's loop, with the reason
    m = train(compose_cfg(BASE + ["trainer.epochs=1", "regularizer=[ensemble,adversarial]"]), tmp_path / "b", [])
    assert m["engine"] == "trainer" and "regularizer adversarial with ensemble" in m["engine_reason"]


def test_population_engine_refuses_what_it_cannot_train(compose_cfg, tmp_path):
    cfg = compose_cfg(BASE + ["trainer.engine=population", "regularizer=[ensemble,adversarial]"])
    with pytest.raises(ConfigError, match="trainer.engine=population.*regularizer adversarial with ensemble"):
        train(cfg, tmp_path / "r", [])
    assert not (tmp_path / "r" / "metrics.json").exists()


@pytest.mark.parametrize("over", [["optimizer=adam", "regularizer=[weight_decay]"],
                                  ["model=cnn_mnist1d", "model.norm=batch", "optimizer=momentum"]],
                         ids=["mlp", "cnn-batch-norm"])
@pytest.mark.parametrize("first,second", [("trainer", "population"), ("population", "trainer")])
def test_a_run_interrupted_in_one_engine_resumes_in_the_other(compose_cfg, tmp_path, monkeypatch, first, second,
                                                              over):
    """SIGTERM in the middle of epoch 2 under ``first``; ``second`` goes on from its checkpoint to
    the weights an uninterrupted run reaches (batch norm's running statistics included)."""
    import math

    import regexp.population.engine as engine
    import regexp.train.trainer as trainer
    from regexp.data import load_data

    over = over + ["trainer.epochs=3"]
    ref = train(compose_cfg(BASE + over + ["trainer.engine=trainer"]), tmp_path / "ref", [])
    steps = math.ceil(len(load_data(compose_cfg(BASE).data, 0).y_train) / 100)
    # both loops ask once per step and once after each epoch's end (the trainer once more at
    # its start): stop in the middle of epoch 2
    monkeypatch.setattr(trainer if first == "trainer" else engine, "StopFlag", lambda: StopAfter(steps + 3))
    m = train(compose_cfg(BASE + over + [f"trainer.engine={first}"]), tmp_path / "run", [])
    assert m["status"] == "interrupted"
    monkeypatch.undo()
    m = train(compose_cfg(BASE + over + [f"trainer.engine={second}", "trainer.resume=true"]), tmp_path / "run", [])
    assert m["status"] == "completed" and m["engine"] == second
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("run", "ref"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL)
    assert [r["epoch"] for r in m["history"]] == [r["epoch"] for r in ref["history"]]



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
def test_a_pruned_run_is_the_same_with_either_engine(compose_cfg, tmp_path, overrides):
    """train()'s on_epoch (a search's pruner) sees the same rows in both engines; pruned after epoch
    2 of 4, each leaves status pruned, pruned_epoch, no final weights or probes, the periodic probes
    before that epoch only, and a checkpoint (status pruned) a later launch goes on from."""
    runs, seen = {}, {}
    for engine in ("trainer", "population"):
        cfg = compose_cfg(BASE + overrides + ["trainer.epochs=4", f"trainer.engine={engine}"])
        seen[engine] = []
        runs[engine] = train(cfg, tmp_path / engine, [], on_epoch=_prune_at(2, seen[engine]))
    pop, lone = runs["population"], runs["trainer"]
    assert (pop["engine"], lone["engine"]) == ("population", "trainer")
    assert [r["epoch"] for r in seen["population"]] == [r["epoch"] for r in seen["trainer"]] == [1, 2]
    for a, b in zip(seen["population"], seen["trainer"]):
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=RTOL, abs=1e-6)
    assert pop["status"] == lone["status"] == "pruned" and pop["pruned_epoch"] == lone["pruned_epoch"] == 2
    assert "stopped_epoch" not in pop and "stopped_epoch" not in lone
    assert [k for k in pop if k != "population_tuning"] == list(lone)
    for k in set(lone) - OWN - {"history", "final", "best", "probe_history"}:
        assert pop[k] == pytest.approx(lone[k], rel=RTOL, abs=1e-6), k
    for rp, rl in zip(pop["history"] + [pop["final"], pop["best"]] + pop.get("probe_history", []),
                      lone["history"] + [lone["final"], lone["best"]] + lone.get("probe_history", []), strict=True):
        assert rp == pytest.approx(rl, rel=RTOL, abs=1e-6)
    files = {p.name for p in (tmp_path / "trainer").iterdir() if not p.name.startswith("events")}
    assert files == {p.name for p in (tmp_path / "population").iterdir() if not p.name.startswith("events")}
    assert "model.pt" not in files and "checkpoint.pt" in files
    cp, cl = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("population", "trainer"))
    assert (cp["status"], cp["epoch"], cp["step_in_epoch"]) == (cl["status"], cl["epoch"], cl["step_in_epoch"]) == (
        "pruned", 2, 0)
    for k in cl["model"]:
        torch.testing.assert_close(cp["model"][k], cl["model"][k], atol=ATOL, rtol=RTOL)
    assert cp["regularizers"] == cl["regularizers"]
    if "probe=[sharpness]" in overrides:  # the periodic probe of the pruned epoch is skipped, not drawn
        assert [r["epoch"] for r in pop["probe_history"]] == [r["epoch"] for r in lone["probe_history"]] == [1]
        assert pop["probes"] == lone["probes"] == {}
        assert torch.equal(cp["probes"]["generator"], cl["probes"]["generator"])
    sp, sl = read_scalars(tmp_path / "population"), read_scalars(tmp_path / "trainer")
    assert set(sp) == set(sl)
    for tag in sl:
        assert [s for s, _ in sp[tag]] == [s for s, _ in sl[tag]], tag
        assert [v for _, v in sp[tag]] == pytest.approx([v for _, v in sl[tag]], rel=1e-3, abs=1e-6), tag
