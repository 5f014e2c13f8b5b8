"""regexp.results: one table of every run below a folder, from real CLI runs of each layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from regexp.errors import ConfigError
from regexp.results import load, load_history
from tests.conftest import run_cli

COMMON = ["trainer.epochs=2", "data.n_train=200"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One folder holding a multirun (with failed jobs), an in-process sweep and a single run."""
    root = tmp_path_factory.mktemp("results")
    # model.width=0 is rejected when the job starts: the two jobs record status failed.
    proc = run_cli(["-m", "model.width=0,8,16", "seed=0,1", *COMMON, f"hydra.sweep.dir={root / 'multi'}"],
                   root, check=False)
    assert "6 jobs (4 completed, 2 failed)" in proc.stdout, proc.stdout + proc.stderr
    run_cli(["task=sweep", "++sweep.params={model.width:[8,16]}", *COMMON, f"hydra.run.dir={root / 'sweep'}"],
            root)
    run_cli(["model.width=4", "regularizer=[dropout,weight_decay]", "regularizer.dropout.p=0.25", *COMMON,
             f"hydra.run.dir={root / 'single'}"], root)
    return root


def _metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _runs(folder: Path):
    return sorted(p.parent for p in folder.rglob("metrics.json")
                  if not any(q.parent != p.parent and p.parent in q.parents for q in folder.rglob("metrics.json")))


def test_multirun_rows_config_and_metrics(root):
    df = load(root / "multi")
    assert len(df) == 6
    assert list(df["run_dir"]) == sorted(df["run_dir"])
    assert df.columns[:3].tolist() == ["run_dir", "status", "error"]
    for _, row in df.iterrows():
        m = _metrics(row["run_dir"])
        name = Path(row["run_dir"]).name  # data.n_train=200,model.width=8,seed=0,trainer.epochs=2
        point = dict(kv.split("=") for kv in name.split(","))
        assert row["model.width"] == int(point["model.width"])
        assert row["seed"] == int(point["seed"])
        assert row["status"] == m["status"]
        if m["status"] == "completed":
            for k, v in m["final"].items():
                assert row[f"final.{k}"] == v  # exactly the recorded number
            for k, v in m["best"].items():
                assert row[f"best.{k}"] == v
            assert row["params"] == m["params"] and row["epochs"] == m["epochs"] == 2
            assert row["wall_s"] == m["wall_s"] and row["device"] == m["device"]
            assert row["optimizer.lr"] == m["config"]["optimizer"]["lr"]
            assert row["trainer.batch_size"] == m["config"]["trainer"]["batch_size"]
            assert row["regularizers"] == ""
            assert pd.isna(row["error"])
    # numeric columns stay numeric, with NaN for the failed jobs
    for col in ("final.test_acc", "best.val_acc", "best.epoch", "params", "wall_s", "model.width", "seed"):
        assert pd.api.types.is_numeric_dtype(df[col]), col
    failed = df[df["status"] == "failed"]
    assert sorted(failed["model.width"]) == [0, 0] and sorted(failed["seed"]) == [0, 1]
    assert failed["error"].str.contains("model.width=0").all()
    # no config of their own: multirun.yaml (the base the jobs were composed from) + their overrides
    done = df[df["status"] == "completed"]
    for col in ("optimizer.lr", "trainer.batch_size", "model.depth", "data.n_train", "trainer.epochs"):
        assert set(failed[col]) == set(done[col]) and len(set(done[col])) == 1, col
    assert (failed["regularizers"] == "").all()
    for col in ("final.test_acc", "final.train_loss", "best.epoch", "params", "wall_s"):
        assert failed[col].isna().all(), col
    assert df.groupby("model.width")["final.test_acc"].count().to_dict() == {0: 0, 8: 2, 16: 2}


def test_history_long_form_equals_metrics_history(root):
    h = load_history(root / "multi")
    assert h.columns.tolist() == ["run_dir", "epoch", "metric", "value"]
    expected = []
    for d in _runs(root / "multi"):
        for entry in _metrics(d).get("history") or []:
            expected += [(str(d), entry["epoch"], k, v) for k, v in entry.items() if k != "epoch"]
    # 4 completed runs x 2 epochs x 8 metrics (6 losses and accuracies, 2 test-set sparsity fractions)
    assert len(h) == len(expected) == 4 * 2 * 8
    got = {(r.run_dir, r.epoch, r.metric): r.value for r in h.itertuples()}
    assert got == {(d, e, k): v for d, e, k, v in expected}
    assert set(h["run_dir"]) <= set(load(root / "multi")["run_dir"])  # joins on run_dir


def test_in_process_sweep_points(root):
    df = load(root / "sweep")
    assert len(df) == 2  # the sweep folder's own files are not a run
    assert sorted(df["model.width"]) == [8, 16]
    assert (df["status"] == "completed").all()
    for _, row in df.iterrows():
        m = _metrics(row["run_dir"])
        assert row["final.test_acc"] == m["final"]["test_acc"]
        assert row["model.width"] == m["config"]["model"]["width"]
        assert f"model.width={row['model.width']}" in Path(row["run_dir"]).name
    assert df["sweep.params.model.width"].tolist() == ["[8,16]"] * 2  # lists as override strings


def test_single_run_folder_and_regularizer_columns(root):
    df = load(root / "single")  # the path itself is the run
    assert len(df) == 1
    row = df.iloc[0]
    assert row["run_dir"] == str(root / "single")
    assert row["regularizers"] == "dropout,weight_decay"
    assert row["regularizer.dropout.p"] == 0.25
    assert row["model.width"] == 4
    assert row["final.test_acc"] == _metrics(root / "single")["final"]["test_acc"]


def test_mixed_root(root):
    df = load(root)
    assert len(df) == 6 + 2 + 1
    assert list(df["run_dir"]) == sorted(df["run_dir"])
    assert set(df["run_dir"]) == {str(d) for d in _runs(root)}
    assert df["regularizer.dropout.p"].isna().sum() == 8  # only the single run has dropout
    assert df.groupby("model.width")["final.test_acc"].count().to_dict() == {0: 0, 4: 1, 8: 3, 16: 3}
    h = load_history(root)
    assert len(h) == 7 * 2 * 8  # 6 losses and accuracies, 2 test-set sparsity fractions
    assert set(h["run_dir"]) == set(df.loc[df["status"] == "completed", "run_dir"])


def test_old_folders_without_config(root, tmp_path):
    """No ``config`` in metrics.json: .hydra/config.yaml (the job's, or the sweep's above) + overrides."""
    for name in ("multi", "sweep"):
        shutil.copytree(root / name, tmp_path / name)
    for f in tmp_path.rglob("metrics.json"):
        m = json.loads(f.read_text())
        if m.pop("config", None) is not None:
            f.write_text(json.dumps(m))
    for name in ("multi", "sweep"):
        new, old = load(tmp_path / name), load(root / name)
        assert len(new) == len(old)
        for (_, a), (_, b) in zip(new.iterrows(), old.iterrows()):
            assert Path(a["run_dir"]).name == Path(b["run_dir"]).name
            for col in ("model.width", "seed", "optimizer.lr", "trainer.epochs", "data.n_train", "status"):
                assert a[col] == b[col] or (pd.isna(a[col]) and pd.isna(b[col])), (name, col)
            if a["status"] == "completed":
                assert a["final.test_acc"] == b["final.test_acc"]
                assert a["regularizers"] == ""


def test_bad_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope.*not a folder"):
        load(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(ConfigError, match="empty.*holds no runs"):
        load(empty)
    with pytest.raises(ConfigError, match="empty.*holds no runs"):
        load_history(empty)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match=str(f).replace(".", r"\.")):
        load(f)


def test_flatten_keeps_lists_as_override_strings():
    from regexp.results import flatten

    assert flatten({"model": {"width": 8, "channels": [8, 16]}, "regularizer": {}, "x": None}) == \
        {"model.width": 8, "model.channels": "[8,16]", "x": None}


def test_failed_job_with_a_group_choice_other_than_the_base(tmp_path):
    """A job that died before writing its config, below a multirun whose base composed model=mlp."""
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  job:\n    name: x\nseed: 0\nmodel:\n  name: mlp\n  width: 100\n"
        "optimizer:\n  name: adam\n  lr: 0.001\nregularizer: {}\nrun_name: ${hydra:job.name}\n")
    job = tmp_path / "0"
    job.mkdir()
    (job / "metrics.json").write_text(json.dumps({"status": "failed", "error": "boom", "overrides": [
        "model=cnn", "regularizer=[dropout]", "regularizer.dropout.p=0.3", "optimizer.lr=0.1", "seed=3"]}))
    row = load(tmp_path).iloc[0]
    assert row["run_dir"] == str(job) and row["status"] == "failed" and row["error"] == "boom"
    assert row["model.name"] == "cnn" and "model.width" not in row.index  # mlp's width is not cnn's
    assert row["optimizer.name"] == "adam" and row["optimizer.lr"] == 0.1 and row["seed"] == 3
    assert row["regularizers"] == "dropout" and row["regularizer.dropout.p"] == 0.3
    assert row["run_name"] == "${hydra:job.name}"  # unresolvable outside Hydra: kept as text
    assert not any(c.startswith("hydra") for c in row.index)
    assert load_history(tmp_path).empty
