"""A sweep's progress: one bar over every point's epochs, one log line per finished point."""
from __future__ import annotations

import io
import logging
import re

import pytest
from tqdm import tqdm

import regexp.population.engine as engine
import regexp.progress as progress
from regexp.progress import SweepProgress, epochs_done
from regexp.sweep import grid, run_points

QUICK = ["trainer.epochs=3", "trainer.eval_every=2", "data.n_train=200", "trainer.threads=1",
         "logger.histogram_every=0", "logger.tensorboard=false"]
LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+): (\w+)")


@pytest.fixture
def bars(monkeypatch):
    """Every sweep bar made, forced on (pytest's stderr is no terminal) and drawn into a buffer;
    each remembers where it started and every count it showed."""
    made = []

    def make(total, initial, desc, disable):
        assert disable is None  # on a terminal only: tqdm decides
        bar = tqdm(total=total, initial=initial, desc=desc, file=io.StringIO(), disable=False)
        bar.start, bar.counts, bar.descs = bar.n, [], []
        update, describe = bar.update, bar.set_description_str

        def counted(n=1):
            update(n)
            bar.counts.append(bar.n)

        def described(desc=None, refresh=True):
            describe(desc, refresh)
            bar.descs.append(desc)

        bar.update, bar.set_description_str = counted, described
        made.append(bar)
        return bar

    monkeypatch.setattr(progress, "make_bar", make)
    return made


@pytest.fixture
def run_bars(monkeypatch):
    """The ``disable`` of every per-bucket bar created (a lone run's bar is its bucket's)."""
    made = []

    def spy(real):
        def make(*a, **kw):
            made.append(kw.get("disable"))
            return real(*a, **kw)
        return make

    monkeypatch.setattr(engine, "tqdm", spy(engine.tqdm))
    return made


def _lines(caplog):
    out = [LINE.match(r.getMessage()) for r in caplog.records if r.name == "regexp.sweep"]
    return [(int(m[1]), int(m[2]), m[3], m[4]) for m in out if m]


@pytest.mark.parametrize("engine_name", ["serial", "population"])
def test_one_bar_over_all_epochs_and_a_line_per_point(compose_cfg, tmp_path, caplog, bars, run_bars, engine_name):
    # trainer.progress=true: inside a sweep the per-run bars are off all the same
    base = compose_cfg(QUICK + ["trainer.progress=true", f"sweep.engine={engine_name}"])
    points = grid({"model.width": [4, 8, 300]}, [0])
    caplog.set_level(logging.INFO, logger="regexp.sweep")
    rows = run_points(base, points, tmp_path)
    assert [r["status"] for r in rows] == ["completed"] * 3

    assert len(bars) == 1
    bar = bars[0]
    assert bar.total == 3 * 3 and bar.start == 0 and bar.n == bar.total
    assert bar.counts == sorted(bar.counts)
    # it moves during a point, not only when one ends: serial at each evaluated epoch (2, 3),
    # a population after every epoch of each bucket
    assert len(bar.counts) > len(points)
    # it names what trains now: the point (serial) or the population bucket, and ends on the count
    now = "sweep 0/3 points | " + ("bucket w<=8 x2" if engine_name == "population" else "model.width=4,seed=0")
    assert now in bar.descs and bar.desc == "sweep 3/3 points"

    names = [f"model.width={w},seed=0" for w in (4, 8, 300)]
    assert sorted(_lines(caplog)) == [(i + 1, 3, names[i], "completed") for i in range(3)]
    assert run_bars and all(d is True for d in run_bars)  # no per-run or per-bucket bar

    # a relaunch: every point is done already, so the bar starts full and each point logs again
    caplog.clear()
    again = run_points(base, points, tmp_path)
    assert [r["status"] for r in again] == ["completed"] * 3
    assert len(bars) == 2 and bars[1].total == bar.total and bars[1].start == bars[1].total
    assert bars[1].n == bars[1].total
    assert sorted(_lines(caplog)) == [(i + 1, 3, names[i], "completed") for i in range(3)]


def test_a_failing_point_counts_as_done_and_logs_failed(compose_cfg, tmp_path, caplog, bars):
    base = compose_cfg(QUICK + ["trainer.progress=false", "sweep.engine=serial"])
    points = [{"model.width": 4, "seed": 0}, {"model.nope": 1, "seed": 0}]
    caplog.set_level(logging.INFO, logger="regexp.sweep")
    rows = run_points(base, points, tmp_path)
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert bars[0].n == bars[0].total == 6
    assert [(i, s) for i, _, _, s in _lines(caplog)] == [(1, "completed"), (2, "failed")]


def test_progress_counts(bars, caplog):
    points = [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    caplog.set_level(logging.INFO, logger="regexp.sweep")
    p = SweepProgress(points, [5, 5, 5])
    p.start(0, 3)  # an earlier launch got 3 epochs into point 0
    p.start(2, 5)  # and finished point 2
    with p:
        assert bars[0].start == 8 and bars[0].total == 15
        p.stage("seed=0")
        p.reach(0, 4)
        p.reach(0, 4)  # the same epoch again changes nothing
        assert bars[0].n == 9
        p.finish(0, {"status": "completed", "train_error": 0.0, "test_error": 0.25, "wall_s": 1.5})
        assert bars[0].n == 10 and bars[0].desc.startswith("sweep 1/3 points | seed=0")
        p.advance([1, 2], 2)  # point 2 cannot go past its 5 epochs
        assert bars[0].n == 12
        p.finish(1, {"status": "interrupted"})  # not counted in full: it goes on next launch
        assert bars[0].n == 12
    assert [r.getMessage() for r in caplog.records if r.name == "regexp.sweep"] == [
        "[1/3] seed=0: completed train_error=0.0000 test_error=0.2500 (1.5 s)", "[2/3] seed=1: interrupted"]


def test_epochs_done_from_an_earlier_launch():
    assert epochs_done({"status": "completed", "epochs": 7}, 10) == 10  # early stopped: finished
    assert epochs_done({"status": "diverged", "epochs": 2}, 10) == 10
    assert epochs_done({"status": "interrupted", "epochs": 4}, 10) == 4
    assert epochs_done({"status": "pruned", "epochs": 3}, 10) == 3
    assert epochs_done({"status": "failed"}, 10) == 0
    assert epochs_done({}, 10) == 0
