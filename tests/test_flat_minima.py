"""``+experiment=flat_minima``: a tiny grid, its tables against the runs' own files."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from regexp.experiments.flat_minima import plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["data.n_train=100", "data.n_test=100", "extra.steps=14", "extra.batch_sizes=[20]", "extra.lrs=[0.1]",
        "extra.seeds=[3]", "extra.sam_lr=0.1", "extra.sam_batch_size=20", "model.width=8", "probe.batch_size=50",
        "probe.hessian.lanczos_steps=4", "probe.hessian.trace_samples=2", "trainer.eval_batch_size=100",
        "logger.tensorboard=false"]


def rows_of(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_rounds_steps_to_whole_epochs():
    assert plan(16, 4000, 3000) == {"epochs": 12, "steps_per_epoch": 250, "steps": 3000}
    assert plan(128, 4000, 3000) == {"epochs": 94, "steps_per_epoch": 32, "steps": 3008}  # 93.75 epochs
    assert plan(4000, 4000, 3) == {"epochs": 3, "steps_per_epoch": 1, "steps": 3}


def test_tiny_flat_minima_writes_its_tables_and_figures(compose_cfg, tmp_path):
    """In-process, as the gallery tests run their tasks (the CLI's own start-up would double the
    cost); the composed config is the one ``python -m regexp.run +experiment=flat_minima`` gets."""
    from regexp.config import validate
    from regexp.tasks import TASKS
    import regexp.experiments  # noqa: F401

    cfg = compose_cfg(["+experiment=flat_minima", *TINY])
    validate(cfg)
    out = tmp_path / "out"
    assert TASKS["flat_minima"](cfg, out, TINY, False)["status"] == "completed"
    rows = rows_of(out / "results.csv")
    # SGD at batch 20, then SAM at the same cell (one seed: the CI budget)
    assert [(r["part"], r["optimizer"], r["trainer.batch_size"], r["seed"]) for r in rows] == [
        ("grid", "sgd", "20", "3"), ("sam", "sam", "20", "3")]
    for r in rows:
        assert int(r["steps"]) == int(r["trainer.epochs"]) * -(-100 // int(r["trainer.batch_size"]))
        run = Path(r["run_dir"])
        metrics = json.loads((run / "metrics.json").read_text())
        assert float(r["probes.hessian/top1"]) == metrics["probes"]["hessian/top1"]
        assert float(r["test_error"]) == pytest.approx(1 - metrics["final"]["test_acc"], abs=1e-12)
        optimizer = metrics["config"]["optimizer"]
        assert (optimizer["name"], optimizer.get("base"), optimizer.get("rho")) == (
            ("sam", "sgd", 0.05) if r["part"] == "sam" else ("sgd", None, None))
    assert [r["trainer.epochs"] for r in rows] == ["3"] * 2  # 14 steps of 5 per epoch: 2.8 rounds to 3
    summary = rows_of(out / "summary.csv")
    for s in summary:
        cell = [r for r in rows if r["part"] == s["part"] and r["trainer.batch_size"] == s["trainer.batch_size"]]
        for col in ("test_error", "probes.hessian/top1", "probes.hessian/trace"):
            vals = [float(r[col]) for r in cell]
            assert float(s[f"{col}_mean"]) == pytest.approx(statistics.mean(vals), rel=1e-12)
            assert float(s[f"{col}_std"]) == 0.0 and s["seeds"] == "1"  # one seed: no spread
    for name in ("flat_minima", "sgd_vs_sam", "margins"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("override, message", [
    ("optimizer=adam", "optimizer.name='adam' is invalid: expected sgd"),
    ("probe=[sharpness]", r"probe=\['sharpness'\] is invalid: expected a list containing hessian"),
    ("extra.steps=0", "extra.steps=0 is invalid"),
    ("extra.batch_sizes=[0]", r"extra.batch_sizes=\[0\] is invalid"),
    ("extra.sam_rho=0", "extra.sam_rho=0.0 is invalid"),
])
def test_flat_minima_refuses_bad_settings(compose_cfg, tmp_path, override, message):
    from regexp.errors import ConfigError
    from regexp.tasks import TASKS
    import regexp.experiments  # noqa: F401

    cfg = compose_cfg(["+experiment=flat_minima", override])
    with pytest.raises(ConfigError, match=message):
        TASKS["flat_minima"](cfg, tmp_path, [], False)
    assert not any(tmp_path.iterdir())
