"""Soft weight sharing end to end: a short real run keeps its accuracy when quantized, and
``+experiment=soft_weight_sharing`` pretrains, retrains from those weights under the prior and
quantizes (Ullrich, Meeds & Welling 2017), reporting numbers equal to its runs'."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.sweep import read_csv
from regexp.tasks import TASKS
from regexp.train.io import read_json

QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tb_images(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["images"])


@pytest.mark.parametrize("seed", [0, 1])
def test_quantized_accuracy_stays_near_the_unquantized_one(compose_cfg, tmp_path, seed):
    """The default prior (16 components, τ = 0.005) on a short MNIST-1D run: snapping every
    weight to its component's mean costs at most 5 points of test accuracy."""
    from regexp.train.trainer import train

    torch.set_num_threads(1)
    cfg = compose_cfg(["regularizer=[soft_weight_sharing]", "regularizer.soft_weight_sharing.quantize=true",
                       "data.n_train=1000", "trainer.epochs=10", "trainer.batch_size=50", f"seed={seed}", *QUICK])
    m = train(cfg, tmp_path)
    extra = m["extra"]
    assert m["final"]["test_acc"] > 0.25  # well above chance (0.1): it learned something, so the comparison means something
    assert abs(extra["soft_weight_sharing/quantized_test_acc"] - m["final"]["test_acc"]) <= 0.05
    assert 2 <= extra["soft_weight_sharing/distinct_values"] <= 16
    assert (tmp_path / "mixture.png").read_bytes()[:8] == PNG_MAGIC
    assert "soft_weight_sharing/mixture" in tb_images(tmp_path)


def run_experiment(compose_cfg, overrides, out: Path):
    import regexp.experiments  # noqa: F401  (registers the task)

    cfg = compose_cfg(["+experiment=soft_weight_sharing", *overrides])
    validate(cfg)
    torch.set_num_threads(1)
    return cfg, TASKS[cfg.task](cfg, out, list(overrides), False)


def test_experiment_pretrains_retrains_from_those_weights_and_quantizes(compose_cfg, tmp_path):
    _, metrics = run_experiment(compose_cfg, ["data.n_train=300", "trainer.epochs=2", "extra.retrain_epochs=2",
                                              *QUICK], tmp_path)
    assert metrics["status"] == "completed"
    [row] = read_csv(tmp_path / "results.csv")
    pre = read_json(tmp_path / "pretrain" / "seed=0" / "metrics.json")
    re = read_json(tmp_path / "retrain" / "seed=0" / "metrics.json")
    # the pretraining has no regularizer; the retraining loads every tensor of it, trains all
    assert pre["config"]["regularizer"] == {} and pre["epochs"] == 2 and re["epochs"] == 2
    # the runs do not carry the experiment's extra, so a relaunch with more seeds reuses them
    assert pre["config"]["extra"] == {} and re["config"]["extra"] == {}
    assert list(re["config"]["regularizer"]) == ["transfer", "soft_weight_sharing"]
    assert re["config"]["regularizer"]["transfer"]["run_dir"] == str(tmp_path / "pretrain" / "seed=0")
    assert re["extra"]["transfer/kept_fresh_tensors"] == 0
    assert re["extra"]["transfer/trainable_params"] == re["params"]
    assert re["config"]["regularizer"]["soft_weight_sharing"]["zero_component"] is True
    # the table holds the runs' own numbers
    assert float(row["pretrained_test_acc"]) == pytest.approx(pre["final"]["test_acc"])
    assert float(row["retrained_test_acc"]) == pytest.approx(re["final"]["test_acc"])
    for key in ("quantized_test_acc", "distinct_values", "zero_fraction", "compression"):
        assert float(row[key]) == pytest.approx(re["extra"][f"soft_weight_sharing/{key}"])
    assert 0 < float(row["zero_fraction"]) < 1
    q = torch.load(tmp_path / "retrain" / "seed=0" / "quantized_model.pt", weights_only=True)
    w = torch.cat([t.reshape(-1) for t in q.values() if t.dim() >= 2])
    assert torch.unique(w).numel() == int(row["distinct_values"])
    assert (w == 0).float().mean().item() == pytest.approx(float(row["zero_fraction"]))
    assert (tmp_path / "weights.png").read_bytes()[:8] == PNG_MAGIC
    assert "figures/weights" in tb_images(tmp_path)


@pytest.mark.parametrize("override,key", [
    ("regularizer.soft_weight_sharing.quantize=false", "regularizer.soft_weight_sharing.quantize"),
    ("extra.retrain_epochs=0", "extra.retrain_epochs"),
])
def test_experiment_refuses_bad_settings(compose_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"^{key}=.* is invalid"):
        run_experiment(compose_cfg, [override, *QUICK], tmp_path)
