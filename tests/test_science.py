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


@pytest.mark.slow
def test_cnn_double_descent_default_peaks_in_every_seed(cli, tmp_path):
    # The default CNN sweep (12 channel counts x 5 seeds, ~250 s of CPU), in this process's one worker.
    out = tmp_path / "dd"
    cli(["+experiment=double_descent_cnn", "++extra.population.workers=1", f"hydra.run.dir={out}"], timeout=1500)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["status"] for r in rows} == {"completed"}
    err: dict = {}
    for r in rows:
        err.setdefault(int(r["model.channels"].strip("[]").split(",")[0]), {})[int(r["seed"])] = float(r["test_error"])
    curve = {int(r["model.channels"].strip("[]").split(",")[0]): r for r in csv.DictReader(open(out / "curve.csv"))}
    threshold = float(next(iter(curve.values()))["threshold"])  # k where params = n_train (~14)
    below = [k for k in err if k < threshold]
    near = [k for k in err if threshold < k <= 3.3 * threshold]  # where the seeds peak (16 to 45)
    widest = max(err)
    seeds = sorted(err[widest])
    assert len(seeds) == 5
    for s in seeds:  # each seed: up after its first descent's best, down again at the widest
        best, peak = min(err[k][s] for k in below), max(err[k][s] for k in near)
        assert peak > best and err[widest][s] < peak - 0.03, (s, best, peak, err[widest][s])
    mean = {k: sum(v.values()) / len(v) for k, v in err.items()}
    first = min(below, key=mean.get)
    top = max(near, key=mean.get)
    assert mean[top] > mean[first] + 0.03 and mean[widest] < mean[top] - 0.05, mean
    assert float(curve[top]["train_error_mean"]) < 0.25 and float(curve[widest]["train_error_mean"]) == 0.0
