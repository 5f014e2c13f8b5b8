"""Early stopping and transfer in a population: each member equals its lone run.

Tolerance as in test_population.py: parameters within |a - b| <= 1e-5 + 1e-4·|b| (float32, only
the summation order inside the batched products differs), logged metrics within a relative 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from regexp.population import use_population

from test_population import ATOL, BASE, RTOL, _assert_same_run, _pop_and_lone
from regexp.sweep import point_name


# patience, min_delta and the monitored metric differ per member, so members stop at different epochs
STOPPING_POINTS = [{"model.width": 8, "seed": 0, "regularizer.early_stopping.patience": 1},
                   {"model.width": 12, "seed": 1, "regularizer.early_stopping.patience": 50},
                   {"model.width": 16, "seed": 2, "regularizer.early_stopping.patience": 1,
                    "regularizer.early_stopping.min_delta": 0.01, "regularizer.early_stopping.monitor": "val_loss"}]

def test_early_stopped_members_stop_at_their_own_epochs_and_match_lone_runs(compose_cfg, tmp_path):
    # patience, min_delta and the monitored metric differ per member, so members stop at
    # different epochs; the others go on in the shrunken stacked tensors. Dropout's MC report
    # runs on each member's final (restored best) weights, with its lone run's generator.
    points = STOPPING_POINTS
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        "optimizer=sgd", "optimizer.lr=0.5", "trainer.epochs=7", "regularizer=[early_stopping,dropout]",
        "regularizer.dropout.p=0.1", "regularizer.dropout.mc_samples=2"], points)
    # alone, the first stops at epoch 5 (best 4); the second runs all 7 epochs and ends with its
    # best (epoch 4) weights restored; the third stops at the last epoch (val_loss, best 7)
    assert [m.get("stopped_epoch") for m in lone] == [5, None, 7]
    assert [m["epochs"] for m in lone] == [5, 7, 7] and [m["best"]["epoch"] for m in lone] == [4, 4, 7]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # model.pt, history, best epoch, extra, scalars, checkpoint
        assert a.get("stopped_epoch") == b.get("stopped_epoch") and a["epochs"] == b["epochs"]
        assert a["final"] == pytest.approx(b["final"], rel=RTOL, abs=1e-6) and a["final"]["epoch"] == a["best"]["epoch"]
        assert "dropout/mc_test_acc" in a["extra"]
        d = tmp_path / "pop" / point_name(p)
        final, best = torch.load(d / "model.pt", weights_only=True), torch.load(d / "best_model.pt", weights_only=True)
        assert all(torch.equal(final[k], best[k]) for k in best)  # the best weights restored


def test_early_stopped_members_probe_their_restored_best_weights_as_lone_runs(compose_cfg, tmp_path):
    """A member's final probes measure the weights model.pt holds (its best epoch's), at the epoch
    it stopped, as its lone run's do; one stopping skips that epoch's periodic probe and draws its
    final one where its lone run draws it. Probe values within the tolerance of
    test_population_probes.py (|a - b| <= 1e-6 + 1e-4·|b|)."""
    from test_population_probes import PROBES, _assert_same_probes

    # alone, the first and third stop at epochs 5 and 6 (periodic probes before, the final one on
    # the best weights), the second runs all 7 epochs and restores epoch 4's weights
    points = STOPPING_POINTS
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        "optimizer=sgd", "optimizer.lr=0.5", "trainer.epochs=7", "regularizer=[early_stopping]",
        "logger.histogram_every=0"] + PROBES, points)
    assert use_population(base, points)
    assert [m.get("stopped_epoch") for m in lone] == [5, None, 6] and [m["best"]["epoch"] for m in lone] == [4, 4, 5]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
        _assert_same_probes(tmp_path, p, a, b, range(1, b["epochs"] + 1))
        cp, cl = (torch.load(tmp_path / d / point_name(p) / "checkpoint.pt", weights_only=True)
                  for d in ("pop", "lone"))
        assert torch.equal(cp["probes"]["generator"], cl["probes"]["generator"])


def _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, overrides, points, epochs_done: int):
    """Train ``points`` as a population stopped by SIGTERM in the middle of epoch
    ``epochs_done + 1`` (batches of 100), re-launch it, train each point alone without a stop;
    return (the interrupted, the resumed, the lone metrics)."""
    import math

    import regexp.population.engine as engine
    from conftest import StopAfter
    from regexp.data import load_data
    from regexp.population import train_population
    from regexp.sweep import point_config
    from regexp.train.trainer import train

    base = compose_cfg(BASE + ["trainer.batch_size=100"] + overrides)
    steps = math.ceil(len(load_data(base.data, 0).y_train) / 100)
    # the loop asks once per step and once after each epoch's end
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(epochs_done * (steps + 1) + steps // 2))
    stopped = train_population(base, points, tmp_path / "pop")
    monkeypatch.undo()
    resumed = train_population(base, points, tmp_path / "pop")
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, resumed, lone):
        assert a["status"] == b["status"] == "completed"
        assert (a.get("stopped_epoch"), a["epochs"], a["best"]["epoch"]) == (b.get("stopped_epoch"), b["epochs"],
                                                                             b["best"]["epoch"])
        wa = torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)
        wb = torch.load(tmp_path / "lone" / point_name(p) / "model.pt", weights_only=True)
        for k in wb:
            torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=RTOL)
        for ra, rb in zip(a["history"], b["history"], strict=True):
            assert ra == pytest.approx(rb, rel=RTOL, abs=1e-6)
    return stopped, resumed, lone


def test_population_with_early_stopping_resumes_exactly(compose_cfg, tmp_path, monkeypatch):
    """SIGTERM in the middle of epoch 5: each member's checkpoint carries its early-stopping
    state (best score, evaluations since); the re-launched population stops each member where
    its lone uninterrupted run stops, with the same weights and records."""
    points = [{"model.width": 8, "seed": 0, "regularizer.early_stopping.patience": 1},
              {"model.width": 16, "seed": 2, "regularizer.early_stopping.patience": 2,
               "regularizer.early_stopping.min_delta": 0.01}]
    stopped, _, lone = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, [
        "optimizer=sgd", "optimizer.lr=0.5", "trainer.epochs=6", "regularizer=[early_stopping]"], points, 4)
    assert [m["status"] for m in stopped] == ["interrupted"] * 2 and [m["epochs"] for m in stopped] == [4, 4]
    # both stop in epoch 5, after the resume: the whole bucket ends at once
    assert [m.get("stopped_epoch") for m in lone] == [5, 5]


def test_population_with_frozen_transfer_resumes_exactly(compose_cfg, tmp_path, monkeypatch):
    """The checkpoint's optimizer state holds the trainable tensors only (as a lone run's);
    the re-launched population reads it back into the right stacked tensors."""
    from regexp.sweep import point_config
    from regexp.train.trainer import train

    train(point_config(compose_cfg(BASE + ["trainer.epochs=1"]), {"seed": 5}), tmp_path / "src", [], sweep=True)
    points = [{"seed": s, "optimizer.lr": lr} for s, lr in ((0, 0.01), (1, 0.003))]
    stopped, _, _ = _interrupt_resume_and_lone(compose_cfg, tmp_path, monkeypatch, [
        "optimizer=adam", "trainer.epochs=3", "regularizer=[transfer]",
        f"regularizer.transfer.run_dir={tmp_path / 'src'}"], points, 1)
    assert [m["status"] for m in stopped] == ["interrupted"] * 2


@pytest.mark.parametrize("optimizer,freeze", [("momentum", False), ("adamw", True), ("sam", True)])
def test_transfer_members_start_from_their_own_runs_and_match_lone_runs(compose_cfg, tmp_path, optimizer, freeze):
    """Each member loads its own finished run (per-member run_dir) into its lone model before
    the weights are stacked; a source of another width lends only the tensors whose shape fits.
    Frozen tensors (freeze: all but the head) stay exactly at their start: no update, no
    decoupled decay (adamw), no penalty, no state in the checkpoint's optimizer."""
    from regexp.population import use_population
    from regexp.sweep import point_config
    from regexp.train.trainer import train

    src = compose_cfg(BASE + ["optimizer=sgd", "trainer.epochs=1"])
    for w, s in ((8, 5), (10, 6)):
        train(point_config(src, {"model.width": w, "seed": s}), tmp_path / f"src{w}", [], sweep=True)
    points = [{"model.width": 8, "seed": 0, "regularizer.transfer.run_dir": str(tmp_path / "src8")},
              {"model.width": 12, "seed": 1, "optimizer.lr": 0.05,
               "regularizer.transfer.run_dir": str(tmp_path / "src10")}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        f"optimizer={optimizer}", "regularizer=[transfer,weight_decay]", f"regularizer.transfer.freeze={freeze}",
        "trainer.grad_clip=1.0", "logger.grad_norms=true"], points)
    assert use_population(base, points)
    start = torch.load(tmp_path / "pop" / point_name(points[0]) / "init_model.pt", weights_only=True)
    source = torch.load(tmp_path / "src8" / "model.pt", weights_only=True)
    assert all(torch.equal(start[k], source[k]) for k in source)  # the whole run loaded
    start = torch.load(tmp_path / "pop" / point_name(points[1]) / "init_model.pt", weights_only=True)
    assert torch.equal(start["head.bias"], torch.load(tmp_path / "src10" / "model.pt", weights_only=True)["head.bias"])
    assert pop[1]["extra"]["transfer/loaded_tensors"] == 1  # only the head's bias fits width 12
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # init_model.pt, model.pt, metrics, scalars, checkpoint
        start = torch.load(tmp_path / "pop" / point_name(p) / "init_model.pt", weights_only=True)
        final = torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)
        assert [torch.equal(final[k], start[k]) for k in start] == [freeze and not k.startswith("head.") for k in start]


def test_frozen_transfer_members_probe_only_their_trained_tensors_as_lone_runs(compose_cfg, tmp_path):
    """A lone run's probes see the parameters that require a gradient (freeze: the head's); the
    batched probes leave the frozen stacked tensors out alike, the narrow member padded (its
    masks kept for the head only). Probe values within |a - b| <= 1e-6 + 1e-4·|b|."""
    from regexp.sweep import point_config
    from regexp.train.trainer import train
    from test_population_probes import PROBES, _assert_same_probes

    src = compose_cfg(BASE + ["optimizer=sgd", "trainer.epochs=1"])
    for w, s in ((8, 5), (12, 6)):
        train(point_config(src, {"model.width": w, "seed": s}), tmp_path / f"src{w}", [], sweep=True)
    points = [{"model.width": w, "seed": s, "regularizer.transfer.run_dir": str(tmp_path / f"src{w}")}
              for w, s in ((8, 0), (12, 1))]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, [
        "optimizer=adam", "regularizer=[transfer]", "regularizer.transfer.freeze=true",
        "logger.histogram_every=0"] + PROBES, points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
        _assert_same_probes(tmp_path, p, a, b)
        # the weights a lone run's probes see: the head's alone (the frozen hidden layers left out)
        assert a["probes"]["norm/l2_weights"] == pytest.approx(
            torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)["head.weight"].norm().item(), rel=1e-5)


def test_every_regularizer_the_population_cannot_train_is_refused_with_its_reason(compose_cfg):
    from regexp.population.compat import NOT_STACKED, REGULARIZERS, incompatibility
    from regexp.regularizers.base import REGULARIZERS as ALL

    # each registered regularizer either trains in a population or has its one-line reason
    assert set(ALL) == set(REGULARIZERS) | set(NOT_STACKED) and not set(REGULARIZERS) & set(NOT_STACKED)
    assert incompatibility(compose_cfg(["regularizer=[weight_decay,ensemble]"])) is None
    # what acts on the Ensemble as one model trains through its owner's slices (FGSM, the batch
    # penalties); what needs one object over all K models stays out, in one line
    assert all(incompatibility(compose_cfg([f"regularizer=[ensemble,{r}]"])) is None
               for r in ("adversarial", "tangent_prop", "gradient_norm_penalty", "soft_weight_sharing"))
    why = incompatibility(compose_cfg(["regularizer=[ensemble,multi_task]"]))
    assert why.startswith("regularizer multi_task with ensemble (") and "\n" not in why
    assert incompatibility(compose_cfg(["regularizer=[early_stopping]", "probe=[sharpness]"])) is None
    for freeze in (True, False):
        assert incompatibility(compose_cfg(["regularizer=[transfer]", "regularizer.transfer.run_dir=x",
                                            f"regularizer.transfer.freeze={freeze}", "probe=[sharpness]"])) is None
