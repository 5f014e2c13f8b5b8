"""Buckets spread over worker processes train every member exactly as one process does.

Both paths use one torch thread, and a member's arithmetic does not depend on the process that
runs it, so weights, optimizer state and metrics agree exactly (atol=0), not within a tolerance.
"""
from __future__ import annotations

import json

import pytest
import torch

from regexp.errors import ConfigError
from regexp.population import train_population
from regexp.population.engine import Options
from regexp.population.run import options
from regexp.population.workers import BucketJob, balance, worker_count
from regexp.sweep import point_name

BASE = ["trainer.epochs=1", "trainer.progress=false", "trainer.threads=1", "data.n_train=400",
        "logger.histogram_every=0", "optimizer=momentum"]
# run metadata, not results: when and how the process ran (population_tuning's source: the
# first run measures the step's form, the second finds it cached; the form itself is compared)
RUNTIME = {"wall_s", "threads", "threads_reason", "started", "finished", "time", "population_tuning"}


def _strip(metrics):
    return {k: v for k, v in metrics.items() if k not in RUNTIME}


@pytest.mark.slow  # ~31-37 s on the loaded 2-core machine (load 8): starting worker processes
def test_two_workers_give_each_member_exactly_the_one_process_result(compose_cfg, tmp_path):
    base = compose_cfg(BASE)
    # widths 8 and 64 are buckets of their own; a batch larger than the training set fails when
    # its bucket starts training (in a worker): that bucket is recorded failed, the others finish
    points = [{"trainer.batch_size": 32, "model.width": w, "seed": 0} for w in (8, 64)] + \
        [{"trainer.batch_size": 10_000, "model.width": 8, "seed": 0}]
    one = train_population(base, points, tmp_path / "one", Options(workers=1))
    two = train_population(base, points, tmp_path / "two", Options(workers=2))
    assert [m["status"] for m in two] == ["completed", "completed", "failed"]
    assert "trainer.batch_size=10000 is invalid" in two[2]["error"] and two[2] == one[2]
    assert json.loads((tmp_path / "two" / point_name(points[2]) / "metrics.json").read_text())["status"] == "failed"
    for p, a, b in zip(points[:2], one, two):
        assert _strip(a) == _strip(b), p
        assert a["population_tuning"]["loop"] == b["population_tuning"]["loop"]
        assert b["threads_reason"] == "workers: 1 per worker process, 2 worker processes"
        name = point_name(p)
        da, db = tmp_path / "one" / name, tmp_path / "two" / name
        assert sorted(f.name for f in da.iterdir() if not f.name.startswith("events")) == \
            sorted(f.name for f in db.iterdir() if not f.name.startswith("events"))
        assert _strip(json.loads((da / "metrics.json").read_text())) == \
            _strip(json.loads((db / "metrics.json").read_text()))
        for f in ("model.pt", "init_model.pt"):
            wa, wb = torch.load(da / f, weights_only=True), torch.load(db / f, weights_only=True)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f
        ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (da, db))
        for i, st in ca["optimizer"]["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(cb["optimizer"]["state"][i][k], v, atol=0, rtol=0)


def test_greedy_longest_first_balance():
    plans = balance([1.0, 7.0, 3.0, 4.0, 2.0], 2)
    assert sorted(j for p in plans for j in p) == [0, 1, 2, 3, 4]  # each job exactly once
    # 7 | 4 | 3 joins the 4 | 2 the 7 | 1 the 4+3: loads 9 and 8, the best split of 17
    assert plans == [[1, 4], [3, 2, 0]]


def test_worker_count_and_its_option(compose_cfg):
    jobs = [BucketJob([i], 8, [8], 1, 1e9) for i in range(3)]
    assert worker_count("auto", jobs, torch.device("cpu"))[0] == 1  # 3 GFLOP: not worth a process
    big = [BucketJob([i], 8, [8], 1, 1e13) for i in range(3)]
    assert worker_count("auto", big, torch.device("cpu"))[0] == min(3, len(__import__("os").sched_getaffinity(0)))
    assert worker_count(5, big, torch.device("cpu"))[0] == 3  # never more than the buckets
    assert worker_count(2, big, torch.device("cuda"))[0] == 1  # one device: one process
    with pytest.raises(ConfigError, match="extra.population.workers"):
        options(compose_cfg(["+extra.population.workers=0"]))
    assert options(compose_cfg(["+extra.population.workers=2"])).workers == 2


@pytest.mark.model_small_widths
def test_small_width_is_the_models_own_unless_set(compose_cfg):
    from regexp.population.engine import small_for
    from regexp.population.run import options

    opts = options(compose_cfg([]))
    assert (small_for(opts, "mlp"), small_for(opts, "cnn"), small_for(opts, "transformer")) == (32, 0, 0)
    assert small_for(options(compose_cfg(["+extra.population.small_width=8"])), "cnn") == 8
    with pytest.raises(ConfigError, match="extra.population.small_width"):
        options(compose_cfg(["+extra.population.small_width=-1"]))
