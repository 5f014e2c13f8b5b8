"""Task ``search`` (Optuna): a small study end to end, its resume, pruning, populations, bad settings."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from regexp.errors import ConfigError  # noqa: E402
from regexp.experiments.search import _study, run_search, settings  # noqa: E402

SMALL = ["+experiment=search", "data.n_train=200", "trainer.epochs=2", "trainer.threads=1"]


def _study_trials(folder: Path):
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'study.db'}")
    return study.get_trials()


def _run_folders(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "metrics.json").exists())


def _best_of(run_dir: Path, metric: str = "val_acc") -> float:
    m = json.loads((run_dir / "metrics.json").read_text())
    return max(r[metric] for r in m["history"])


def test_study_end_to_end_and_resume(cli, tmp_path):
    out = tmp_path / "study"
    proc = cli(SMALL + ["extra.search.n_trials=4", f"hydra.run.dir={out}"])
    runs = _run_folders(out)
    assert len(runs) == 4
    trials = _study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == pytest.approx(max(_best_of(r) for r in runs))
    assert best["value"] == pytest.approx(_best_of(Path(best["folder"])))
    assert (out / "best_config.yaml").exists() and (out / "trials.csv").exists()
    best_lines = [line for line in proc.stdout.splitlines() if line.startswith("best: ")]
    assert len(best_lines) == 1 and f"trial={best['trial']}" in best_lines[0]
    assert json.loads((out / "metrics.json").read_text())["status"] == "completed"

    # relaunching with more trials continues the study: two new trials, the first four untouched
    mtimes = {r: os.stat(r / "metrics.json").st_mtime_ns for r in runs}
    cli(SMALL + ["extra.search.n_trials=6", f"hydra.run.dir={out}"])
    trials = _study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert len(_run_folders(out)) == 6
    assert {r: os.stat(r / "metrics.json").st_mtime_ns for r in runs} == mtimes
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == pytest.approx(max(_best_of(r) for r in _run_folders(out)))


def test_pruned_trial(cli, tmp_path):
    """A pruned trial stops after the epoch its pruner rejects: status pruned, no final weights,
    the study's trials PRUNED and no best value."""
    out = tmp_path / "search"
    # val_acc can never exceed 1.01: the threshold pruner stops every trial after its first epoch
    cli(SMALL + ["trainer.epochs=3", "extra.search.n_trials=2", "extra.search.pruner=threshold",
                 "extra.search.threshold=1.01", "extra.search.warmup=0", f"hydra.run.dir={out}"])
    trials = _study_trials(out)
    assert [t.state.name for t in trials] == ["PRUNED"] * 2
    runs = _run_folders(out)
    assert len(runs) == 2
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        assert m["status"] == "pruned" and m["pruned_epoch"] == 1 and len(m["history"]) == 1
        assert m["engine"] == "population" and not (run / "model.pt").exists()
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        assert (ck["status"], ck["epoch"]) == ("pruned", 1)
    assert json.loads((out / "best.json").read_text())["value"] is None


@pytest.mark.parametrize("override, key", [
    ("extra.search.sampler=annealing", "extra.search.sampler"),
    ("+extra.search.space.model.widht={type:int,low:8,high:16}", "model.widht"),
    ("extra.search.pruner=threshold", "extra.search.threshold"),
    ("extra.search.space.model.activation.choices=[relu,swish]", "extra.search.space.model.activation"),
])
def test_bad_settings(cli, tmp_path, override, key):
    proc = cli(SMALL + [override, f"hydra.run.dir={tmp_path / 'bad'}"], check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], proc.stderr
    assert not (tmp_path / "bad" / "study.db").exists()


def test_settings_checks(compose_cfg):
    cfg = compose_cfg(SMALL)
    st = settings(cfg)
    assert st.sampler == "tpe" and st.direction == "maximize" and set(st.space) == {
        "optimizer.lr", "model.width", "model.activation"}
    for overrides, key in [
        (["extra.search.sampler=grid"], "extra.search.space.optimizer.lr.type"),  # float with grid
        (["+extra.search.space.model={type:categorical,choices:[mlp]}"], "extra.search.space.model"),
        (["extra.search.space.model.width.low=0"], "extra.search.space.model.width.low"),  # log: true
        (["extra.search.space.model.width.high=4"], "extra.search.space.model.width"),  # low > high
        (["extra.search.metric=val_f1"], "extra.search.metric"),
        (["extra.search.parallel=0"], "extra.search.parallel"),
        (["+extra.search.trials=3"], "extra.search.trials"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            settings(compose_cfg(SMALL + overrides))


def test_grid_population_and_retry(compose_cfg, tmp_path, monkeypatch):
    """A grid over population-compatible keys, two trials at a time; a trial left running by an
    interrupted launch is trained by the next launch."""
    cfg = compose_cfg(["task=search", "data.n_train=200", "trainer.epochs=2", "trainer.threads=1",
                       "trainer.progress=false", "logger.histogram_every=0",
                       "+extra.search={sampler:grid,parallel:2,pruner:none,space:{model:{width:{type:int,low:8,"
                       "high:9}},optimizer:{lr:{type:categorical,choices:[0.01]}}}}"])
    st = settings(cfg)
    assert st.n_trials == 2  # capped at the grid's size
    study = _study(st, tmp_path)
    from regexp.experiments.search import _distributions

    study.ask(_distributions(st.space))  # a launch that died mid-trial leaves it running
    import regexp.population as population

    calls = []
    real = population.train_population
    monkeypatch.setattr(population, "train_population",  # a spy: the two trials form one population
                        lambda base, points, out: calls.append(points) or real(base, points, out))
    metrics = run_search(cfg, tmp_path, [], False)
    assert len(calls) == 1 and len(calls[0]) == 2
    assert metrics["status"] == "completed" and metrics["points"] == 2
    trials = _study_trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2  # the stale trial itself completed
    assert sorted(t.params["model.width"] for t in trials) == [8, 9]
    assert len(_run_folders(tmp_path)) == 2
