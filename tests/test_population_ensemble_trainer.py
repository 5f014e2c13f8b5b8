"""An ensemble run in the population (its K models as K stacked slices, regexp/population/ensemble.py)
against the trainer's loop over the lone Ensemble module (trainer.engine=trainer), without dropout
(whose masks the two engines draw in different orders).

This file goes with the trainer's loop. Stated tolerance, test_one_loop.py's: every parameter
within |a - b| <= 1e-5 + 1e-4·|b| after 2 epochs (float32; the summation order inside the batched
products differs), every metric (metrics.json's rows and ``extra``) within a relative 1e-4, every
TensorBoard scalar within 1e-3.
"""
from __future__ import annotations

import pytest

from test_one_loop import _assert_same, _both


@pytest.mark.parametrize("overrides", [
    ["regularizer=[ensemble,weight_decay]", "regularizer.ensemble.components=3", "optimizer=adam"],
    ["regularizer=[ensemble,label_smoothing]", "regularizer.ensemble.components=2",
     "regularizer.ensemble.bootstrap=true", "optimizer=momentum", "trainer.grad_clip=0.5"],
    ["regularizer=[ensemble,early_stopping]", "regularizer.ensemble.components=2", "optimizer=sgd",
     "regularizer.early_stopping.patience=1", "trainer.epochs=4", "regularizer.early_stopping.monitor=val_loss",
     "regularizer.early_stopping.min_delta=1.0"],
    # activity penalties: each model's own hidden activations, summed over the K as over the Ensemble's sites
    ["regularizer=[ensemble,activity_l1,activity_student_t]", "regularizer.ensemble.components=2", "optimizer=adam"],
    ["regularizer=[ensemble,activity_kl]", "regularizer.ensemble.components=2", "model.activation=sigmoid",
     "optimizer=adam"],
    # SAM's ascent under one norm over the K models, as over the Ensemble's parameters
    ["regularizer=[ensemble]", "regularizer.ensemble.components=2", "optimizer=sam", "optimizer.rho=0.1"],
    # every stacked model: its K models as K slices (batch norm's running statistics per model)
    ["regularizer=[ensemble]", "regularizer.ensemble.components=2", "model=cnn_mnist1d", "model.norm=batch",
     "optimizer=momentum"],
    ["regularizer=[ensemble]", "regularizer.ensemble.components=2", "model=transformer", "model.depth=1",
     "model.heads=2", "model.mlp_ratio=2.0", "model.embed_dim=8", "optimizer=momentum"],
    ["regularizer=[ensemble]", "regularizer.ensemble.components=2", "model=gru", "optimizer=adam"],
], ids=["adam-decay", "bagging-smoothing-clip", "early-stopping", "activity-l1-student-t", "activity-kl", "sam",
                                                        "cnn-batch-norm", "transformer", "gru"])
def test_an_ensemble_in_the_population_equals_the_trainers_loop(compose_cfg, tmp_path, overrides):
    pop, lone = _both(compose_cfg, tmp_path, overrides)
    _assert_same(tmp_path, pop, lone)
    assert pop["extra"] == pytest.approx(lone["extra"], rel=1e-4, abs=1e-6)
    assert any(k.startswith("ensemble/") for k in pop["extra"])
    assert pop.get("stopped_epoch") == lone.get("stopped_epoch") == (2 if "early" in str(overrides) else None)


@pytest.mark.parametrize("first,second", [("trainer", "population"), ("population", "trainer")])
def test_an_ensemble_interrupted_in_one_engine_resumes_in_the_other(compose_cfg, tmp_path, monkeypatch, first,
                                                                    second):
    # the checkpoint's model, optimizer state (the K models' in the Ensemble's order), bootstrap
    # counts, data order and partial loss sums read alike by both loops
    from test_one_loop import test_a_run_interrupted_in_one_engine_resumes_in_the_other as resumes

    over = ["regularizer=[ensemble]", "regularizer.ensemble.components=2", "regularizer.ensemble.bootstrap=true",
            "optimizer=adam"]
    resumes(compose_cfg, tmp_path, monkeypatch, first, second, over)
