"""Sharded in-process sweeps: `-m sweep.shard=0,1 sweep.shards=2` spreads one grid over the jobs of a
multirun (here the real submitit_local launcher); the points meet in <hydra.sweep.dir>/points/ and
the last shard to finish writes one report over all of them."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.experiments.sweep_task import shard_points
from regexp.sweep import grid, point_name

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (4, 8, 12, 16)


def test_shards_split_the_grid_round_robin():
    points = grid({"model.width": [1, 2, 3, 4, 5], "optimizer.lr": [0.1, 0.2]}, [0])
    shares = [shard_points(points, i, 3) for i in range(3)]
    assert shares[0] == [points[0], points[3], points[6], points[9]]
    assert shares[1] == [points[1], points[4], points[7]]
    assert shares[2] == [points[2], points[5], points[8]]
    assert sorted(map(point_name, sum(shares, []))) == sorted(map(point_name, points))  # each exactly once
    assert shard_points(points, 0, 1) == points
    assert shard_points(points[:2], 2, 3) == []  # more shards than points: an idle shard


@pytest.mark.parametrize("overrides, message", [
    (["sweep.shards=0"], "sweep.shards=0 is invalid: expected an integer >= 1"),
    (["sweep.shard=2", "sweep.shards=2"], "sweep.shard=2 is invalid: expected an integer in [0, 1]"),
    (["sweep.shard=-1"], "sweep.shard=-1 is invalid: expected an integer in [0, 0]"),
])
def test_bad_shard_settings_name_the_key(compose_cfg, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(overrides))
    assert str(e.value).startswith(message)
    validate(compose_cfg(["sweep.shard=3", "sweep.shards=4"]))  # in range: accepted


def test_shards_without_a_multirun_are_one_error_line(cli, tmp_path):
    proc = cli(["task=sweep", "++sweep.params={model.width:[4,8]}", "sweep.shards=2", "trainer.epochs=1",
                "data.n_train=200", f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sweep.shards=2 needs a multirun"), proc.stderr
    assert not (tmp_path / "run" / "model.width=4,seed=0").exists()  # nothing trained


def _read_rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_submitit_local_shards_train_the_grid_once_and_report_it_together(cli, tmp_path):
    sweep = tmp_path / "multirun"
    args = ["-m", "hydra/launcher=submitit_local", "task=sweep", "++sweep.params={model.width:[4,8,12,16]}",
            "sweep.shards=2", "sweep.shard=0,1", "trainer.epochs=1", "data.n_train=200",
            f"hydra.sweep.dir={sweep}"]
    proc = cli(args, timeout=600)
    assert "2 jobs (2 completed)" in proc.stdout, proc.stdout + proc.stderr

    points = sweep / "points"
    names = [f"model.width={w},seed=0" for w in WIDTHS]
    assert sorted(d.name for d in points.iterdir() if d.is_dir()) == sorted(names)
    metrics = {n: json.loads((points / n / "metrics.json").read_text()) for n in names}
    assert all(m["status"] == "completed" and m["epochs"] == 1 for m in metrics.values())
    assert {n: m["config"]["model"]["width"] for n, m in metrics.items()} == dict(zip(names, WIDTHS))

    # Each shard's own job folder records its share: round-robin over the grid, disjoint, complete.
    shards = {}
    for f in sweep.glob("*/metrics.json"):
        if f.parent != points:
            m = json.loads(f.read_text())
            shards[m["shard"]] = m
    assert sorted(shards) == [0, 1]
    assert shards[0]["share"] == [names[0], names[2]] and shards[1]["share"] == [names[1], names[3]]
    assert all(m["status"] == "completed" and m["points"] == 2 and m["grid"] == 4 for m in shards.values())
    assert max(m["done"] for m in shards.values()) == 4  # the last shard to finish saw every point
    assert any(m["report"] for m in shards.values())
    for shard_dir in (f.parent for f in sweep.glob("*/metrics.json") if f.parent != points):
        assert not any(p.name.startswith("model.width=") for p in shard_dir.iterdir())  # no point there

    # One report over both shards' points, its numbers those of each point's metrics.json.
    rows = _read_rows(points / "results.csv")
    assert [r["model.width"] for r in rows] == [str(w) for w in WIDTHS]
    for r, n in zip(rows, names):
        m = metrics[n]
        assert r["status"] == "completed" and r["seed"] == "0"
        assert r["params"] == str(m["params"]) and r["epochs"] == "1"
        assert float(r["test_error"]) == 1.0 - m["final"]["test_acc"]
        assert float(r["train_loss"]) == m["final"]["train_loss"]
        assert r["best_epoch"] == str(m["best"]["epoch"]) and float(r["wall_s"]) == m["wall_s"]
    assert len(_read_rows(points / "curve.csv")) == 4
    assert (points / "sweep.png").stat().st_size > 0
    assert not list(points.glob(".*tmp*"))  # no temporary file left behind

    # scripts/plot_sweep.py reads the same folder through regexp.results: the same results.csv.
    before = (points / "results.csv").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    q = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(points), "--x", "model.width"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr
    assert (points / "results.csv").read_bytes() == before

    # A relaunch trains nothing: every point already holds its completed run.
    stamps = {n: ((points / n / "metrics.json").stat().st_mtime_ns, (points / n / "metrics.json").read_bytes())
              for n in names}
    proc = cli(args, timeout=600)
    assert "2 jobs (2 completed)" in proc.stdout, proc.stdout + proc.stderr
    assert {n: ((points / n / "metrics.json").stat().st_mtime_ns, (points / n / "metrics.json").read_bytes())
            for n in names} == stamps
    assert len(_read_rows(points / "results.csv")) == 4


def test_a_run_folder_appearing_while_a_shard_reads_is_not_there_yet(tmp_path, monkeypatch):
    """Regression: a shard listed the run folders twice (the table, then the folders) and failed
    with a KeyError when the other shard finished a point between the two listings."""
    from regexp import results
    from regexp.analysis.collect import run_metrics

    def write_run(name):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"status": "completed", "epochs": 1, "final": {"test_acc": 0.5}}))
        return d

    first = write_run("model.width=4,seed=0")
    listing = results.find_run_dirs
    calls = []

    def racing_listing(root):
        calls.append(root)
        if len(calls) == 2:  # the other shard finishes a point after the first listing
            write_run("model.width=8,seed=0")
        return listing(root)

    monkeypatch.setattr(results, "find_run_dirs", racing_listing)
    found = run_metrics(tmp_path)
    assert len(calls) >= 2
    assert list(found) == [first] and found[first]["status"] == "completed"
    assert set(run_metrics(tmp_path)) == {first, tmp_path / "model.width=8,seed=0"}  # seen on the next read
