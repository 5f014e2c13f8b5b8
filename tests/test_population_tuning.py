"""The per-machine choice of a CPU bucket's form (regexp/population/tuning.py): the mechanism,
never a timing. Timings here are fake: the clock is replaced, so every assertion is exact."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from regexp.errors import ConfigError
from regexp.population import tuning

KEY = "manual relu in40 out10 depth2 widths[300, 300] pad300 batch100 penalties none"


class FakeClock:
    """A clock that only the fake step advances: the batched form costs ``cost[False]``
    seconds per step, the member loop ``cost[True]``."""

    def __init__(self, batched: float, loop: float):
        self.now, self.cost, self.calls = 0.0, {False: batched, True: loop}, {False: 0, True: 0}

    def __call__(self) -> float:
        return self.now

    def step(self, loop: bool) -> None:
        self.calls[loop] += 1
        self.now += self.cost[loop]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REGEXP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "population_tuning.json"


@pytest.mark.parametrize("batched,loop", [(3 / 1024, 1 / 1024), (1 / 1024, 3 / 1024), (2 / 1024, 2 / 1024)])
def test_the_decision_picks_the_faster_form_and_ties_stay_batched(monkeypatch, batched, loop):
    clock = FakeClock(batched, loop)
    monkeypatch.setattr(tuning, "_clock", clock)
    assert tuning.time_forms(clock.step) == (batched, loop)
    assert clock.calls[False] == clock.calls[True] >= 3  # warm-up and interleaved rounds, both forms alike
    assert tuning.faster_is_loop(batched, loop) is (loop < batched)


def test_measurement_stops_at_its_budget_after_two_rounds(monkeypatch):
    clock = FakeClock(0.4, 0.4)  # 0.8 s a round against a 1 s budget: 2 rounds, not 5
    monkeypatch.setattr(tuning, "_clock", clock)
    tuning.time_forms(clock.step)
    assert clock.calls == {False: 3, True: 3}  # 1 warm-up + 2 timed each


def test_the_cache_is_written_then_reused_without_measuring(cache, monkeypatch):
    clock = FakeClock(3e-3, 1e-3)
    monkeypatch.setattr(tuning, "_clock", clock)
    first = tuning.cached_choice(KEY, lambda: tuning.time_forms(clock.step))
    assert (first.loop, first.source) == (True, "measured")
    assert (first.batched_ms, first.loop_ms) == (pytest.approx(3.0), pytest.approx(1.0))
    stored = json.loads(cache.read_text())
    assert stored["machines"][tuning.machine_key()][KEY] == {"loop": True, "batched_ms": first.batched_ms,
                                                             "loop_ms": first.loop_ms}
    steps = dict(clock.calls)

    second = tuning.cached_choice(KEY, lambda: pytest.fail("a cached shape was measured again"))
    assert (second.loop, second.source, second.cpu) == (True, "cached", tuning.cpu_model())
    assert clock.calls == steps
    # another machine (CPU, torch or thread count) is a different entry: measured anew
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    other = tuning.cached_choice(KEY, lambda: (1e-3, 3e-3))
    assert (other.loop, other.source) == (False, "measured")
    assert len(json.loads(cache.read_text())["machines"]) == 2


@pytest.mark.parametrize("content", ["{not json", '{"version": 0, "machines": {}}', "[1, 2]",
                                     '{"version": 1, "machines": {"MACHINE": 3}}'])
def test_a_corrupt_cache_is_reported_ignored_and_rewritten(cache, caplog, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content.replace("MACHINE", tuning.machine_key()))
    measured = []
    with caplog.at_level(logging.WARNING, logger="regexp.population"):
        choice = tuning.cached_choice(KEY, lambda: measured.append(1) or (1e-3, 2e-3))
    assert measured == [1] and (choice.loop, choice.source) == (False, "measured")
    assert len([r for r in caplog.records if "unreadable" in r.message and str(cache) in r.message]) == 1
    assert json.loads(cache.read_text())["machines"][tuning.machine_key()][KEY]["loop"] is False


def _bucket(width: int, device: str = "cpu"):
    """What choose_loop reads of a bucket when the choice is not measured."""
    return SimpleNamespace(net=SimpleNamespace(width=width, loop=None, fancy=False), device=torch.device(device),
                           members=[None, None])


@pytest.mark.parametrize("loop_width,width,loop", [(1, 20, True), (256, 300, True), (256, 192, False),
                                                   (0, 1024, False)])
def test_an_explicit_loop_width_wins_without_measuring(cache, monkeypatch, loop_width, width, loop):
    monkeypatch.setattr(tuning, "cached_choice", lambda *a: pytest.fail("measured despite an explicit loop_width"))
    monkeypatch.setattr(tuning, "shape_key", lambda b, batch, manual: f"{manual} pad{b.net.width} batch{batch}")
    b = _bucket(width)
    choice = tuning.choose_loop(b, loop_width, 100, True)
    assert b.net.loop is choice.loop is loop
    assert choice.source == f"extra.population.loop_width={loop_width}" and not cache.exists()
    assert tuning.record(choice) == {"loop": loop, "source": choice.source, "cpu": tuning.cpu_model(),
                                     "key": f"True pad{width} batch100"}


def test_a_gpu_bucket_is_batched_without_measuring(monkeypatch):
    monkeypatch.setattr(tuning, "cached_choice", lambda *a: pytest.fail("measured on a GPU"))
    b = _bucket(4096, "meta")  # any non-CPU device
    assert tuning.choose_loop(b, None, 100, True).loop is False and b.net.loop is False


@pytest.mark.parametrize("value", [-1, "fast", 2.5, True])
def test_an_invalid_loop_width_is_one_config_error(compose_cfg, value):
    from regexp.population.run import options

    with pytest.raises(ConfigError, match=r"extra.population.loop_width=.* expected an integer >= 0"):
        options(compose_cfg([f"+extra.population.loop_width={str(value).lower()}"]))


@pytest.mark.parametrize("value,want", [("auto", "auto"), ("null", None), ("300", 300)])
def test_loop_width_auto_null_and_integers_are_accepted(compose_cfg, value, want):
    from regexp.population.run import options

    assert options(compose_cfg([f"+extra.population.loop_width={value}"])).loop_width == want


def test_a_population_measures_once_records_its_choice_and_then_reuses_it(compose_cfg, cache, monkeypatch,
                                                                          tmp_path):
    """End to end: the first population measures its bucket's own step (the fake clock makes
    the member loop faster) and trains with that form; the second reads the cache; both write
    the choice into every member's metrics.json, and the trained weights follow the form."""
    from regexp.population import train_population
    from regexp.sweep import point_name

    clock = FakeClock(3e-3, 1e-3)
    forms = []

    def timed(b, batch, manual):
        real = tuning_step(b, batch, manual)

        def step(loop):
            real(loop)  # the bucket's own step runs (its shapes must work in both forms)
            forms.append(loop)
            clock.step(loop)
        return step

    tuning_step = tuning._step
    monkeypatch.setattr(tuning, "_clock", clock)
    monkeypatch.setattr(tuning, "_step", timed)
    base = compose_cfg(["trainer.epochs=1", "trainer.progress=false", "trainer.threads=1", "data.n_train=300",
                        "logger.histogram_every=0", "optimizer=sgd"])
    points = [{"model.width": 12, "seed": 0}, {"model.width": 16, "seed": 1}]
    first = train_population(base, points, tmp_path / "a")
    assert forms and set(forms) == {False, True}
    for m in first:
        t = m["population_tuning"]
        assert (t["loop"], t["source"], t["cpu"]) == (True, "measured", tuning.cpu_model())
        assert (t["batched_ms"], t["loop_ms"]) == (pytest.approx(3.0), pytest.approx(1.0))
        assert "widths[12, 16] pad16" in t["key"]
        assert list(m)[list(m).index("threads_reason") + 1] == "population_tuning"

    forms.clear()
    second = train_population(base, points, tmp_path / "b")
    assert forms == []  # cached: nothing measured
    assert [m["population_tuning"]["source"] for m in second] == ["cached", "cached"]
    for a, b in zip(first, second):
        assert a["final"] == b["final"]  # the same form, the same run
    on_disk = json.loads((tmp_path / "b" / point_name(points[0]) / "metrics.json").read_text())
    assert on_disk["population_tuning"]["loop"] is True


# ---------------------------------------------------------------- evaluation chunks
def _eval_bucket(device: str = "cpu"):
    return SimpleNamespace(net=SimpleNamespace(width=100), members=[None] * 3, device=torch.device(device))


def test_the_evaluation_chunk_is_the_fastest_budget_then_cached(cache, monkeypatch):
    """Each distinct chunk is timed alike (budgets giving the same rows once, as the smallest);
    the fastest is kept, and a second bucket of that shape reads it without evaluating."""
    cost = {1: 5e-3, 4: 2e-3, 16: 3e-3, 64: 1e-3}  # per MiB of budget; 64 MiB is 16 MiB's chunk
    clock = FakeClock(0, 0)
    calls = []

    def evaluate(budget: int) -> None:
        calls.append(budget >> 20)
        clock.now += cost[budget >> 20]

    monkeypatch.setattr(tuning, "_clock", clock)
    monkeypatch.setattr(tuning, "eval_key", lambda b, rows: f"eval pad{b.net.width} rows{rows}")
    chunk_of = lambda budget: min(budget >> 20, 16) * 10  # rows: the split caps the 64 MiB chunk
    got = tuning.choose_eval_budget(_eval_bucket(), 1 << 20, 4000, evaluate, chunk_of, scales=(1, 4, 16, 64))
    assert got == 4 << 20
    assert sorted(set(calls)) == [1, 4, 16] and calls.count(1) == calls.count(4) == calls.count(16) >= 3
    entry = json.loads(cache.read_text())["machines"][tuning.machine_key()]["eval pad100 rows4000"]
    assert entry == {"eval_bytes": 4 << 20, "eval_ms": {str(1 << 20): 5.0, str(4 << 20): 2.0, str(16 << 20): 3.0}}
    again = tuning.choose_eval_budget(_eval_bucket(), 1 << 20, 4000, lambda b: pytest.fail("measured again"),
                                      chunk_of, scales=(1, 4, 16, 64))
    assert again == 4 << 20


def test_one_possible_chunk_or_a_gpu_is_not_measured(cache):
    never = lambda budget: pytest.fail("measured")
    # every budget gives the whole split: nothing to choose
    assert tuning.choose_eval_budget(_eval_bucket(), 1 << 20, 50, never, lambda budget: 50) == 1 << 20
    # on other devices the largest chunk: kernel launches, not caches, set the cost there
    assert tuning.choose_eval_budget(_eval_bucket("meta"), 1 << 20, 4000, never, lambda budget: budget >> 10) \
        == 16 << 20
    assert not cache.exists()
