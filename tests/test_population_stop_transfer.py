"""Early stopping and transfer in a population: each member equals its lone run.

Tolerance as in test_population.py: parameters within |a - b| <= 1e-5 + 1e-4·|b| (float32, only
the summation order inside the batched products differs), logged metrics within a relative 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from test_population import ATOL, BASE, RTOL, _assert_same_run, _pop_and_lone
from regexp.sweep import point_name


def test_early_stopped_members_stop_at_their_own_epochs_and_match_lone_runs(compose_cfg, tmp_path):
    # patience, min_delta and the monitored metric differ per member, so members stop at
    # different epochs; the others go on in the shrunken stacked tensors
    points = [{"model.width": 8, "seed": 0, "regularizer.early_stopping.patience": 1},
              {"model.width": 12, "seed": 1, "regularizer.early_stopping.patience": 1,
               "regularizer.early_stopping.monitor": "val_loss"},
              {"model.width": 16, "seed": 2, "regularizer.early_stopping.patience": 50,
               "regularizer.early_stopping.min_delta": 0.01}]
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, ["optimizer=sgd", "optimizer.lr=0.5", "trainer.epochs=7",
                                                         "regularizer=[early_stopping]"], points)
    # the lone runs stop at epochs 5 and 6 (best epochs 4 and 5); the third runs all 7 epochs
    # and ends with its best (epoch 5) weights restored
    assert [m.get("stopped_epoch") for m in lone] == [5, 6, None]
    assert [m["epochs"] for m in lone] == [5, 6, 7] and [m["best"]["epoch"] for m in lone] == [4, 5, 5]
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # model.pt, history, best epoch, scalars, checkpoint
        assert a.get("stopped_epoch") == b.get("stopped_epoch") and a["epochs"] == b["epochs"]
        assert a["final"] == pytest.approx(b["final"], rel=RTOL, abs=1e-6) and a["final"]["epoch"] == a["best"]["epoch"]
        d = tmp_path / "pop" / point_name(p)
        final, best = torch.load(d / "model.pt"), torch.load(d / "best_model.pt")
        assert all(torch.equal(final[k], best[k]) for k in best)  # the best weights restored
