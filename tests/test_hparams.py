"""TensorBoard's HParams tab over a log dir mixing a multirun, an in-process sweep and a single run.

The log dir is read the way ``tensorboard --logdir`` reads it: TensorBoard's event multiplexer
and data provider, and the hparams plugin's own HTTP routes (``/experiment`` and
``/session_groups``, called in-process with the JSON requests the frontend sends).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from regexp.train.tblog import TBLogger
from regexp.train.trainer import _hparams

COMMON = ["trainer.epochs=1", "data.n_train=200"]
METRICS = [f"hparams/{when}_{split}_{kind}" for when in ("final", "best") for split in ("val", "test")
           for kind in ("acc", "loss")] + ["hparams/status", "hparams/params"]


def plugin_client(logdir: Path):
    """A werkzeug client for the hparams plugin's routes, over ``logdir`` as TensorBoard loads it."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import hparams_plugin
    from werkzeug import Client, Response

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    ctx = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                                data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)))
    routes = hparams_plugin.HParamsPlugin(ctx).get_plugin_apps()

    def post(route: str, body: dict) -> dict:
        resp = Client(lambda environ, start: routes[route](environ, start), Response).post(
            route, data=json.dumps(body), content_type="application/json")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return json.loads(resp.get_data(as_text=True))

    return post


def dotted(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def as_shown(v):
    """A config value as the hparams plugin returns it in JSON."""
    if v is None:
        return "None"
    if isinstance(v, (list, tuple)):
        return json.dumps(v)
    if isinstance(v, bool) or isinstance(v, str):
        return v
    return float(v)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    from conftest import run_cli

    root = tmp_path_factory.mktemp("outputs")
    cwd = tmp_path_factory.mktemp("cwd")
    run_cli(["-m", "model.width=8,16", *COMMON, f"hydra.sweep.dir={root / 'multi'}"], cwd)
    run_cli(["task=sweep", "++sweep.params={optimizer.lr:[0.01,0.02]}", *COMMON,
             f"hydra.run.dir={root / 'sweep'}"], cwd)
    run_cli(["regularizer=[dropout]", "data.label_noise=0.1", *COMMON, f"hydra.run.dir={root / 'single'}"], cwd)
    return root


def test_hparams_tab_lists_every_key_and_metric(logdir):
    post = plugin_client(logdir)
    runs = {p.parent.relative_to(logdir).as_posix(): json.loads(p.read_text()) for p in logdir.rglob("metrics.json")}
    runs = {name: m for name, m in runs.items() if "history" in m}  # the training runs, not the sweep's summary
    assert len(runs) == 5, sorted(runs)

    exp = post("/experiment", {"experimentName": ""})
    infos = {h["name"]: h for h in exp["hparamInfos"]}
    for key in ("model.width", "model.name", "optimizer.lr", "optimizer.name", "data.label_noise", "data.n_train",
                "trainer.batch_size", "trainer.epochs", "scheduler.name", "seed", "regularizers",
                "regularizer.dropout.p"):
        assert key in infos, (key, sorted(infos))
    for key in ("model.width", "optimizer.lr", "data.label_noise", "regularizers"):
        assert infos[key].get("differs") is True, infos[key]
    for key in ("trainer.epochs", "trainer.batch_size", "seed", "model.name", "scheduler.name"):
        assert not infos[key].get("differs", False), infos[key]
    # every run has the same keys, apart from its regularizers' own settings
    metric_tags = {m["name"]["tag"] for m in exp["metricInfos"] if not m["name"].get("group")}
    assert set(METRICS) <= metric_tags, sorted(metric_tags)

    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    col_params = [{"hparam": k} for k in infos] + [{"metric": m["name"]} for m in exp["metricInfos"]]
    resp = post("/session_groups", {"experimentName": "", "allowedStatuses": statuses, "colParams": col_params,
                                    "startIndex": 0, "sliceSize": 1000})
    groups = {g["name"]: g for g in resp["sessionGroups"]}
    assert sorted(groups) == sorted(runs)  # one group per run, named by its folder under the log dir
    assert {n.split("/")[0] for n in groups} == {"multi", "sweep", "single"}
    for name, m in runs.items():
        g = groups[name]
        hp = g["hparams"]
        assert set(hp) >= set(infos) - {k for k in infos if k.startswith("regularizer.")}, name
        for key, value in hp.items():
            if key == "regularizers":
                assert value == (",".join(m["config"]["regularizer"]) or "none")
            else:
                assert value == as_shown(dotted(m["config"], key)), (name, key)
        assert len(g["sessions"]) == 1 and g["sessions"][0]["name"] == name
        assert g["sessions"][0]["status"] == "STATUS_SUCCESS"
        shown = {v["name"]["tag"]: v["value"] for v in g["metricValues"] if not v["name"].get("group")}
        for when in ("final", "best"):
            for k, v in m[when].items():
                assert shown[f"hparams/{when}_{k}"] == pytest.approx(v, rel=1e-6), (name, when, k)
        assert shown["hparams/status"] == 1.0 and shown["hparams/params"] == m["params"]
    assert groups["single"]["hparams"]["regularizers"] == "dropout"
    assert groups["single"]["hparams"]["data.label_noise"] == 0.1
    assert {groups[n]["hparams"]["model.width"] for n in groups if n.startswith("multi/")} == {8.0, 16.0}
    assert {groups[n]["hparams"]["optimizer.lr"] for n in groups if n.startswith("sweep/")} == {0.01, 0.02}


def test_no_experiment_summary_and_end_status(tmp_path, compose_cfg):
    """Each run writes only its session start (no experiment summary, which TensorBoard would use
    for every run); an interrupted run's session is left open, to be ended by its resumed run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg(["trainer.batch_size=full"])
    for name, status in (("done", "completed"), ("stopped", "interrupted"), ("nan", "diverged")):
        tb = TBLogger(tmp_path / name)
        tb.hparams(_hparams(cfg, [], 10))
        tb.final_metrics({"status": status, "epochs": 2, "params": 10, "final": {"epoch": 2, "test_acc": 0.5},
                          "best": None, "extra": {"mc_dropout_acc": 0.25}})
        tb.close()
        acc = EventAccumulator(str(tmp_path / name))
        acc.Reload()
        assert "_hparams_/experiment" not in acc.summary_metadata
        assert "_hparams_/session_start_info" in acc.summary_metadata
        assert ("_hparams_/session_end_info" in acc.summary_metadata) == (status != "interrupted")
        scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
        step = 3 if status == "interrupted" else 2  # a resumed run (purge_step=3) drops the former
        assert scalars["hparams/final_test_acc"] == [(step, 0.5)]
        assert scalars["hparams/extra_mc_dropout_acc"] == [(step, 0.25)]
        assert scalars["hparams/status"] == [(step, {"completed": 1.0, "interrupted": 0.0, "diverged": -1.0}[status])]
    post = plugin_client(tmp_path)
    resp = post("/session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                                    "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE"]})
    status = {g["name"]: g["sessions"][0].get("status", "STATUS_UNKNOWN") for g in resp["sessionGroups"]}
    assert status == {"done": "STATUS_SUCCESS", "stopped": "STATUS_UNKNOWN", "nan": "STATUS_FAILURE"}
    assert resp["sessionGroups"][0]["hparams"]["trainer.batch_size"] == "full"
