"""The mnist1d_benchmark experiment: the paper's four models, and a table that agrees with the runs."""
from __future__ import annotations

import json

import pytest

import regexp.experiments  # noqa: F401  (registers the tasks)
from regexp.config import validate
from regexp.errors import ConfigError
from regexp.experiments.mnist1d_benchmark import Model, model_config
from regexp.experiments.regularizer_comparison import mean_std
from regexp.sweep import read_csv
from regexp.tasks import TASKS

PAPER = {"logistic": 32.0, "mlp": 68.0, "cnn": 94.0, "gru": 91.0}
PARAMS = {"logistic": 410, "mlp": 15210, "cnn": 5210, "gru": 5134}
MODEL_NAME = {"logistic": "mlp", "mlp": "mlp", "cnn": "cnn", "gru": "gru"}


def test_benchmark_table_matches_the_runs(compose_cfg, tmp_path):
    out = tmp_path / "bench"
    # the GRU with its own seeds (extra.models.<name>.seeds), the others with extra.seeds
    cfg = compose_cfg(["+experiment=mnist1d_benchmark", "extra.seeds=[0,1]", "+extra.models.gru.seeds=[1,2]",
                       "trainer.epochs=1", "data.n_train=200", "data.n_test=100", "logger.tensorboard=false"])
    validate(cfg)
    assert TASKS["mnist1d_benchmark"](cfg, out, [], False)["status"] == "completed"
    seeds = {m: ((1, 2) if m == "gru" else (0, 1)) for m in PAPER}
    runs = read_csv(out / "runs.csv")
    assert [(x["model"], x["seed"]) for x in runs] == [(m, str(s)) for m in PAPER for s in seeds[m]]
    table = {row["model"]: row for row in read_csv(out / "results.csv")}
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [line.split()[1] for line in rows] == list(PAPER)  # one row per model, in order
    for name, paper in PAPER.items():
        metrics = [json.loads((out / f"model={name}" / f"seed={s}" / "metrics.json").read_text()) for s in seeds[name]]
        assert all(m["status"] == "completed" and m["params"] == PARAMS[name] for m in metrics)
        mean, std = mean_std([100 * m["final"]["test_acc"] for m in metrics])
        assert float(table[name]["test_acc_mean"]) == pytest.approx(mean)
        assert float(table[name]["test_acc_std"]) == pytest.approx(std)
        assert float(table[name]["paper_test_acc"]) == paper
        assert float(table[name]["difference"]) == pytest.approx(mean - paper)
        assert f"| {PARAMS[name]} | {paper:.1f}% | {mean:.1f} ± {std:.1f}% | {mean - paper:+.1f} | no |" in rows[
            list(PAPER).index(name)]
        # the paper's protocol: Adam 1e-2, batch 100, every training signal (no validation split)
        saved = metrics[0]["config"]
        assert (saved["optimizer"]["name"], saved["optimizer"]["lr"], saved["trainer"]["batch_size"]) == ("adam", 0.01, 100)
        assert saved["data"]["val_fraction"] == 0.0 and saved["model"]["name"] == MODEL_NAME[name]
    assert json.loads((out / "model=logistic" / "seed=0" / "metrics.json").read_text())["config"]["model"]["depth"] == 0
    assert not (out / "model=gru" / "seed=0").exists()


@pytest.mark.parametrize("override, message", [
    ("extra.only=[logistic,svm]", "extra.only=['logistic', 'svm'] is invalid: expected names among extra.models: logistic, mlp, cnn, gru"),
    ("+extra.models.gru.seeds=[]", "extra.models.gru.seeds=[] is invalid: expected a non-empty list of integers"),
    ("extra.models.cnn.paper_acc=94", "extra.models.cnn.paper_acc=94.0 is invalid: expected a number in [0, 1]"),
    ("+extra.nosuch=1", "extra.nosuch is invalid for task=mnist1d_benchmark"),
])
def test_bad_settings_are_refused_naming_the_key(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg(["+experiment=mnist1d_benchmark", override])
    with pytest.raises(ConfigError) as e:
        TASKS["mnist1d_benchmark"](cfg, tmp_path, [], False)
    assert message in str(e.value)
    assert not list(tmp_path.iterdir())  # refused before anything was trained


def test_model_keys_are_checked_against_the_option():
    with pytest.raises(ConfigError, match=r"extra.models.cnn.keys=.* is invalid for model=cnn_mnist1d: .*depth"):
        model_config("cnn", Model("cnn_mnist1d", 0.94, {"depth": 0}))
    assert model_config("logistic", Model("mlp", 0.32, {"depth": 0})).depth == 0
