"""``probe=[...]`` in a run: what it writes, that it leaves training alone, where it is refused."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, read_scalars
from regexp.errors import ConfigError
from regexp.population import use_population
from regexp.train.trainer import train

TINY = ["trainer.epochs=3", "trainer.progress=false", "trainer.threads=1", "data.n_train=200",
        "model.width=16", "logger.histogram_every=0"]
HESSIAN = ["probe.batch_size=64", "probe.hessian.lanczos_steps=6", "probe.hessian.trace_samples=2"]
PROBES = ["probe=[hessian,sharpness]", *HESSIAN, "probe.sharpness.samples=2",
          "probe.sharpness.noise_microbatches=4"]
KEYS = {"hessian/top1", "hessian/top2", "hessian/top3", "hessian/trace", "hessian/trace_stderr",
        "hessian/density_min", "hessian/density_max",
        "sharpness/loss", "sharpness/rho", "sharpness/average",
        "norm/l2", "norm/l2_weights", "norm/frobenius_product",
        "margin/q05", "margin/q25", "margin/q50", "margin/q75", "margin/q95", "margin/nonpositive",
        "grad_noise/trace", "grad_noise/grad_norm_sq", "grad_noise/simple_scale"}


def test_probes_write_metrics_history_scalars_and_density_figure(compose_cfg, tmp_path):
    m = train(compose_cfg(PROBES + TINY + ["probe.every=2"]), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["probes"]) == KEYS
    # every 2 epochs (epoch 2) and at the end (epoch 3), once each
    assert [r["epoch"] for r in saved["probe_history"]] == [2, 3]
    assert saved["probe_history"][-1] == {"epoch": 3, **saved["probes"]} == {"epoch": 3, **m["probes"]}
    scalars = read_scalars(tmp_path)
    assert {t for t in scalars if t.startswith("probe/")} == {f"probe/{k}" for k in KEYS}
    assert [s for s, _ in scalars["probe/hessian/top1"]] == [2, 3]
    assert scalars["probe/norm/l2"][-1][1] == pytest.approx(saved["probes"]["norm/l2"], rel=1e-6)
    assert (tmp_path / "hessian_density.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["images"] == ["probe/hessian_density"]
    (image,) = acc.Images("probe/hessian_density")
    assert image.step == 3 and image.encoded_image_string == (tmp_path / "hessian_density.png").read_bytes()
    # a sweep's results row carries the final values
    from regexp.results import run_row
    row = run_row(tmp_path)
    assert {k: v for k, v in row.items() if k.startswith("probes.")} == {f"probes.{k}": v for k, v in m["probes"].items()}
    # the norm probe agrees with the final weights in model.pt
    w = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["probes"]["norm/l2"] == pytest.approx(float(sum(v.double().pow(2).sum() for v in w.values())) ** 0.5)


def test_probes_do_not_change_training(compose_cfg, tmp_path):
    # dropout draws from the global generator every step: a probe that drew from it would shift
    # every later mask
    reg = ["regularizer=[dropout]"]
    off = train(compose_cfg(reg + TINY), tmp_path / "off")
    on = train(compose_cfg(reg + PROBES + TINY + ["probe.every=1"]), tmp_path / "on")
    assert "probes" not in off and len(on["probe_history"]) == 3
    assert on["history"] == off["history"]
    a = torch.load(tmp_path / "off" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "on" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_probe_draws_are_fixed_by_the_seed(compose_cfg, tmp_path):
    cfg = compose_cfg(["probe=[hessian]"] + HESSIAN + TINY)
    one, two = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    assert one["probes"] == two["probes"]


def test_population_measures_probes_and_a_sweep_reports_them(compose_cfg, tmp_path):
    base = ["trainer.epochs=1", "data.n_train=200"]
    assert use_population(compose_cfg(base + PROBES), [{"seed": 0}])  # auto: the population measures them
    from regexp.sweep import run_points
    (row,) = run_points(compose_cfg(PROBES + TINY + ["trainer.epochs=1"]), [{"model.width": 8}], tmp_path)
    probes = json.loads(next(tmp_path.rglob("metrics.json")).read_text())["probes"]
    assert set(probes) == KEYS
    assert {k: v for k, v in row.items() if k.startswith("probes.")} == {f"probes.{k}": v for k, v in probes.items()}


def test_every_probe_composes_alone_and_together(compose_cfg):
    from regexp.config import validate
    from regexp.probes import PROBES

    names = sorted(p.stem for p in (CONFIGS / "probe").glob("*.yaml"))
    assert set(names) == set(PROBES)
    for chosen in [[n] for n in names] + [names]:
        cfg = compose_cfg([f"probe=[{','.join(chosen)}]"])
        validate(cfg)
        assert [n for n in PROBES if cfg.probe[n] is not None] == sorted(chosen, key=list(PROBES).index)
    with pytest.raises(ConfigError, match=r"probe.sharpness.noise_microbatches=1 is invalid: expected an integer >= 2"):
        validate(compose_cfg(["probe=[sharpness]", "probe.sharpness.noise_microbatches=1"]))


def test_interrupted_run_resumes_to_the_same_probes(compose_cfg, tmp_path, monkeypatch):
    from conftest import StopAfter
    import regexp.population.engine as population_engine

    # 200 examples, batch 100: 2 steps an epoch, and one more check after each epoch's end
    cfg = compose_cfg(PROBES + TINY + ["probe.every=1", "trainer.batch_size=100"])
    whole = train(cfg, tmp_path / "whole")
    # the loop asks once per step and after each epoch's end: inside epoch 2
    monkeypatch.setattr(population_engine, "StopFlag", lambda: StopAfter(3))
    stopped = train(cfg, tmp_path / "cut")
    monkeypatch.undo()
    assert stopped["status"] == "interrupted" and [r["epoch"] for r in stopped["probe_history"]] == [1]
    resumed = train(compose_cfg(PROBES + TINY + ["probe.every=1", "trainer.batch_size=100",
                                                 "trainer.resume=true"]), tmp_path / "cut")
    assert resumed["probe_history"] == whole["probe_history"]
