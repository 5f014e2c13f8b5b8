"""Sweeps through the shipped launchers: one process per job, each with its share of the cores."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("launcher", ["submitit_local", "local_parallel"])
def test_two_job_sweep_completes(cli, tmp_path, launcher):
    sweep = tmp_path / launcher
    proc = cli(["-m", f"hydra/launcher={launcher}", "seed=0,1", "trainer.epochs=1", "data.n_train=300",
                f"hydra.sweep.dir={sweep}"], timeout=600)
    assert "sweep: 2 jobs (2 completed)" in proc.stdout
    runs = {d.name: json.loads((d / "metrics.json").read_text()) for d in sweep.iterdir()
            if d.is_dir() and not d.name.startswith(".")}
    assert sorted(runs) == ["data.n_train=300,seed=0,trainer.epochs=1", "data.n_train=300,seed=1,trainer.epochs=1"]
    assert all(m["status"] == "completed" for m in runs.values())
    if launcher == "local_parallel":  # two jobs on two cores: one thread each, never oversubscribed
        assert all(m["threads"] == 1 for m in runs.values())
