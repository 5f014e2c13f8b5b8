"""The regularizer_comparison experiment: run folders, and tables that agree with them."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from regexp.errors import ConfigError
from regexp.experiments.regularizer_comparison import mean_std, variant_regularizers
from regexp.sweep import read_csv

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, *overrides):
    return subprocess.run([sys.executable, "-m", "regexp.run", "+experiment=regularizer_comparison",
                           f"hydra.run.dir={out}", *overrides], cwd=ROOT, capture_output=True, text=True)


def test_mean_std_is_the_sample_statistic():
    assert mean_std([0.1, 0.3]) == (pytest.approx(0.2), pytest.approx(math.sqrt(0.02)))
    assert mean_std([0.4]) == (0.4, 0.0)


def test_variants_are_checked_against_the_regularizer_schemas():
    regs = variant_regularizers("drop", {"dropout": {"p": 0.2}})
    assert regs["dropout"].p == 0.2 and regs["dropout"].input_p == 0.0  # schema default filled in
    with pytest.raises(ConfigError, match="extra.variants.x.nope is invalid"):
        variant_regularizers("x", {"nope": {}})
    with pytest.raises(ConfigError, match="extra.variants.x.dropout is invalid"):
        variant_regularizers("x", {"dropout": {"q": 1}})


def test_comparison_tables_match_the_runs(tmp_path):
    out = tmp_path / "cmp"
    r = run(out, "extra.only=[none,dropout]", "sweep.seeds=[0,1]", "trainer.epochs=2", "data.n_train=200",
            "data.n_test=200")
    assert r.returncode == 0, r.stderr
    runs = read_csv(out / "runs.csv")
    assert [(x["regularizer"], x["seed"]) for x in runs] == [("none", "0"), ("none", "1"),
                                                            ("dropout", "0"), ("dropout", "1")]
    table = {row["regularizer"]: row for row in read_csv(out / "results.csv")}
    md = (out / "results.md").read_text()
    for v in ("none", "dropout"):
        metrics = [json.loads((out / v / f"seed={s}" / "metrics.json").read_text()) for s in (0, 1)]
        assert all(m["status"] == "completed" for m in metrics)
        test = [1 - m["final"]["test_acc"] for m in metrics]
        gap = [1 - m["final"]["test_acc"] - (1 - m["final"]["train_acc"]) for m in metrics]
        mean, std = mean_std(test)
        assert float(table[v]["test_error_mean"]) == pytest.approx(mean)
        assert float(table[v]["test_error_std"]) == pytest.approx(std)
        assert float(table[v]["gap_mean"]) == pytest.approx(sum(gap) / 2)
        assert f"| {v} | 2 | {mean:.4f} ± {std:.4f} |" in md
    # the dropout runs really used dropout (with the MC evaluation beside weight scaling)
    m = json.loads((out / "dropout" / "seed=0" / "metrics.json").read_text())
    assert "dropout/mc_test_acc" in m["extra"]
    assert list((out / "summary").glob("events.out.tfevents.*"))


def test_unknown_variant_is_a_clear_error(tmp_path):
    r = run(tmp_path / "bad", "extra.only=[nothing]")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: extra.only=['nothing'] is invalid")
