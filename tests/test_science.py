"""Science checks on the real experiments at their defaults (minutes each: marked slow)."""
from __future__ import annotations

import csv

import pytest


@pytest.mark.slow
def test_model_wise_double_descent_default_shows_the_peak(cli, tmp_path):
    # The default grid, split over two single-threaded workers (one per core, round-robin shards):
    # each member's result is the one it gets alone, and the suite takes half the time.
    out = tmp_path / "dd"
    proc = cli(["-m", "+experiment=double_descent", "hydra/launcher=local_parallel", "sweep.shards=2",
                "sweep.shard=0,1", f"hydra.sweep.dir={out}"], timeout=1500)
    assert "2 jobs (2 completed)" in proc.stdout, proc.stdout + proc.stderr
    rows = {int(r["model.width"]): r for r in csv.DictReader(open(out / "points" / "curve.csv"))}
    test = {w: float(r["test_error_mean"]) for w, r in rows.items()}
    train = {w: float(r["train_error_mean"]) for w, r in rows.items()}
    threshold = float(rows[min(rows)]["threshold"])  # the width where params = n_train
    near = [w for w in test if threshold / 1.6 <= w <= threshold * 1.6]
    peak = max(near, key=test.get)
    below = min((w for w in test if w < threshold / 1.6), key=test.get)  # the first descent's best
    widest = max(test)
    assert test[peak] > test[below] + 0.03, (test, threshold)  # a visible peak near the threshold
    assert test[widest] < test[peak] - 0.05, test  # and a second descent
    assert all(train[w] <= 0.005 for w in test if w >= 1.5 * threshold), train  # wide models interpolate
    assert train[below] > 0.1  # the small model that generalizes best does not
