"""End to end through the real command line: files, event tags, metrics, multirun."""
from __future__ import annotations

import json

import pytest

from conftest import read_scalars


def test_run_writes_events_that_agree_with_metrics(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli(["trainer.epochs=3", "model.width=32", "regularizer=[weight_decay,dropout]",
                "regularizer.weight_decay.lam=0.001", "logger.histogram_every=1", f"hydra.run.dir={run}"])
    assert proc.stdout.strip().splitlines()[-1] == str(run)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["epochs"] == 3
    assert m["params"] == 40 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert set(m["final"]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                               "test_zero_frac", "test_near_zero_frac"}
    assert m["device"] == "cpu" and "regularizer.weight_decay.lam=0.001" in m["overrides"]

    scalars = read_scalars(run)
    for tag in ("loss/train", "loss/val", "loss/test", "acc/train", "acc/val", "acc/test", "lr",
                "weights/l2_norm", "penalty/weight_decay",
                "grad_norm/hidden.0.weight", "grad_norm/hidden.3.weight", "grad_norm/head.weight"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
    for split in ("train", "val", "test"):
        for kind in ("loss", "acc"):
            logged = [v for _, v in scalars[f"{kind}/{split}"]]
            expected = [row[f"{split}_{kind}"] for row in m["history"]]
            assert logged == pytest.approx(expected, rel=1e-6)
            assert logged[-1] == pytest.approx(m["final"][f"{split}_{kind}"], rel=1e-6)
    # best is the epoch with the highest validation accuracy
    best = max(m["history"], key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert m["best"] == best
    assert "penalty/dropout" not in scalars  # dropout adds no loss term
    assert all(v > 0.0 for _, v in scalars["penalty/weight_decay"])
    assert [v for _, v in scalars["lr"]] == pytest.approx([0.001] * 3)

    # weight histograms and the HParams entry live in the run's own folder, not a sub-folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    assert any(t.startswith("weights/hidden.0.weight") for t in acc.Tags()["histograms"])
    assert "_hparams_/session_start_info" in acc.summary_metadata
    assert "_hparams_/experiment" not in acc.summary_metadata
    assert [p for p in run.iterdir() if p.is_dir() and p.name != ".hydra"] == []
    for name in ("model.pt", "best_model.pt", "checkpoint.pt"):
        assert (run / name).is_file()


def test_multirun_2x2(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "model.width=8,16", "seed=0,1", "trainer.epochs=1", f"hydra.sweep.dir={sweep}"])
    assert "sweep: 4 jobs (4 completed)" in proc.stdout
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["model.width=16,seed=0,trainer.epochs=1", "model.width=16,seed=1,trainer.epochs=1",
                    "model.width=8,seed=0,trainer.epochs=1", "model.width=8,seed=1,trainer.epochs=1"]
    params = {}
    for j in jobs:
        m = json.loads((sweep / j / "metrics.json").read_text())
        assert m["status"] == "completed"
        params[j] = m["params"]
        assert list((sweep / j).glob("events.out.tfevents.*"))
    assert params[jobs[0]] == params[jobs[1]] == 40 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    # different seeds give different runs
    a, b = (json.loads((sweep / j / "metrics.json").read_text())["final"] for j in jobs[2:])
    assert a != b


def test_full_batch_is_gradient_descent(cli, tmp_path):
    run = tmp_path / "gd"
    cli(["trainer.batch_size=full", "optimizer=sgd", "trainer.epochs=2", "data.n_train=200",
         f"hydra.run.dir={run}"])
    scalars = read_scalars(run)
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 2 and len(scalars["loss/train_running"]) == 2


def test_cnn_and_transformer_on_mnist1d(cli, tmp_path):
    for model, extra in (("cnn", ["optimizer=sgd", "optimizer.lr=0.05", "scheduler=warmup_cosine",
                                  "scheduler.warmup_steps=5"]),
                         ("transformer", ["model.embed_dim=16", "model.depth=1", "model.heads=2"])):
        run = tmp_path / model
        cli([f"model={model}", "trainer.epochs=1", "data.n_train=300", *extra, f"hydra.run.dir={run}"])
        assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
