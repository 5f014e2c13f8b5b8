"""Masked-segment reconstruction (the pretext task) against hand-written values and gradients,
and ``+experiment=self_supervised``: the fine-tuned runs start from the pretrained trunk exactly."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.models.mlp import MLP
from regexp.population.pretext import MemberPretext
from regexp.regularizers.base import Context
from regexp.regularizers.masked_reconstruction import MaskedReconstruction, masked_mse, segment_mask
from regexp.sweep import read_csv
from regexp.tasks import TASKS
from regexp.train.io import read_json

QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_segment_mask_is_one_run_of_the_given_length_starting_anywhere_it_fits():
    g = torch.Generator().manual_seed(0)
    m = segment_mask(4000, 12, 5, g)
    assert m.shape == (4000, 12) and m.dtype == torch.bool
    assert (m.sum(1) == 5).all()
    start = m.int().argmax(1)
    # exactly positions start..start+4: one contiguous run
    assert torch.equal(m, (torch.arange(12) >= start[:, None]) & (torch.arange(12) < start[:, None] + 5))
    # every start 0..7 occurs, about equally often (uniform: 500 each, 5 sd of a binomial is ~110)
    counts = torch.bincount(start, minlength=8)
    assert len(counts) == 8 and ((counts - 500).abs() < 110).all()


def test_masked_mse_value_and_gradient_on_a_constructed_signal():
    target = torch.arange(2 * 2 * 6, dtype=torch.float32).reshape(2, 2, 6)  # n=2, C=2, L=6
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:3] = True  # 2 positions × 2 channels
    mask[1, 4:6] = True
    pred = target.flatten(1).clone()
    # errors: +1 and -2 inside the masks, +100 outside (must be ignored)
    pred[0, 1] += 1.0   # channel 0, position 1: masked
    pred[0, 6 + 2] -= 2.0  # channel 1, position 2: masked
    pred[1, 4] += 3.0  # channel 0, position 4: masked
    pred[0, 0] += 100.0  # position 0: visible
    pred[1, 6 + 3] += 100.0  # position 3: visible
    pred.requires_grad_(True)
    loss = masked_mse(pred, target, mask)
    # (1 + 4 + 9) / (C · masked positions = 2 · 4)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 8)
    loss.backward()
    expected = torch.zeros_like(pred)
    expected[0, 1], expected[0, 8], expected[1, 4] = 2 * 1.0 / 8, 2 * -2.0 / 8, 2 * 3.0 / 8
    torch.testing.assert_close(pred.grad, expected)


def _regularizer(segment=4, fill=0.0, shape=(1, 40)):
    return MaskedReconstruction(MaskedReconstruction.Config(segment=segment, fill=fill),
                                Context(10, 100, torch.device("cpu"), shape, 0, model_cfg=type("M", (), {"name": "mlp"})))


def test_the_batch_is_masked_and_the_loss_is_the_masked_mse_of_the_reconstruction_head():
    reg = _regularizer(segment=4, fill=-7.0)
    model = reg.wrap_model(MLP(40, 10, 8, 1))
    assert model.head.out_features == 40  # one output per position: the reconstruction head
    # the population's pretext step (regexp/population/pretext.py), one member per generator
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    pretext = MemberPretext(reg.cfg.segment, [reg.cfg.fill] * 2, gens, (1, 40), torch.device("cpu"))
    x = torch.randn(2, 16, 40)
    xm = pretext.draw(x)
    out = torch.stack([model(xm[m].view(16, 1, 40)) for m in range(2)])
    loss = pretext.loss(out)
    assert not torch.equal(pretext.mask[0], pretext.mask[1])  # each member its own segments
    for m in range(2):
        mask = pretext.mask[m]
        assert (mask.sum(1) == 4).all()
        assert (xm[m][mask] == -7.0).all() and torch.equal(xm[m][~mask], x[m][~mask])
        expected = ((out[m] - x[m]) ** 2)[mask].mean()
        torch.testing.assert_close(loss[m], expected)


@pytest.mark.parametrize("segment,shape,key", [(40, (1, 40), "regularizer.masked_reconstruction.segment=40"),
                                               (4, (1, 28, 28), "regularizer=[masked_reconstruction]")])
def test_a_segment_too_long_or_inputs_that_are_not_signals_are_refused(segment, shape, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('[', '.').replace(']', '.')} is invalid"):
        _regularizer(segment=segment, shape=shape).wrap_model(MLP(40, 10, 8, 1))


def _experiment(compose_cfg, tmp_path, extra_overrides=()):
    import regexp.experiments  # noqa: F401  (registers the task)

    overrides = ["+experiment=self_supervised", "model.width=16", "trainer.epochs=3", "extra.pretrain_epochs=1",
                 "extra.labels=[20]", "extra.seeds=[0,1]", "data.val_fraction=0.95", *QUICK, *extra_overrides]
    cfg = compose_cfg(overrides)
    validate(cfg)
    torch.set_num_threads(1)
    return TASKS[cfg.task](cfg, tmp_path, overrides, False)


def test_fine_tuning_starts_from_the_pretrained_trunk_and_the_tables_hold_the_runs_numbers(compose_cfg, tmp_path):
    metrics = _experiment(compose_cfg, tmp_path)
    assert metrics == {"status": "completed", "runs": 8, "failed": 0}  # 2 pretrain + 2 seeds × 3 arms
    for seed in (0, 1):
        pre_dir = tmp_path / "pretrain" / f"seed={seed}"
        pre = read_json(pre_dir / "metrics.json")
        assert list(pre["config"]["regularizer"]) == ["masked_reconstruction"] and pre["config"]["data"]["n_train"] is None
        trained = torch.load(pre_dir / "model.pt", weights_only=True)
        assert trained["head.weight"].shape == (40, 16)
        for n in (20,):
            name = f"data.n_train={n},trainer.batch_size={n},seed={seed}"
            fine = read_json(tmp_path / "finetune" / name / "metrics.json")
            assert fine["config"]["regularizer"]["transfer"] == {"run_dir": str(pre_dir), "file": "model.pt",
                                                                 "freeze": False}
            start = torch.load(tmp_path / "finetune" / name / "init_model.pt", weights_only=True)
            for k, v in trained.items():  # the trunk as pretrained, bit for bit; the head fresh
                if k.startswith("head."):
                    assert start[k].shape[0] == 10
                else:
                    assert torch.equal(start[k], v), k
            # the linear probe trains the head only: its trunk is still the pretrained one at the end
            probe = torch.load(tmp_path / "linear_probe" / name / "model.pt", weights_only=True)
            assert all(torch.equal(probe[k], v) for k, v in trained.items() if not k.startswith("head."))
            scratch = torch.load(tmp_path / "scratch" / name / "init_model.pt", weights_only=True)
            assert not torch.equal(scratch["hidden.0.weight"], trained["hidden.0.weight"])
    rows = read_csv(tmp_path / "results.csv")
    acc = {}
    for r in rows:
        run = read_json(Path(r["run_dir"]) / "metrics.json")
        assert float(r["test_acc"]) == pytest.approx(run["final"]["test_acc"])
        acc[(r["arm"], int(r["labels"]), int(r["seed"]))] = float(r["test_acc"])
    for s in read_csv(tmp_path / "summary.csv"):
        arm, n = s["arm"], int(s["labels"])
        assert float(s["test_acc_mean"]) == pytest.approx(statistics.mean(acc[(arm, n, k)] for k in (0, 1)))
        if arm != "scratch":
            gains = [acc[(arm, n, k)] - acc[("scratch", n, k)] for k in (0, 1)]
            assert float(s["gain_mean"]) == pytest.approx(statistics.mean(gains))
            assert float(s["gain_sd"]) == pytest.approx(statistics.stdev(gains))
    for p in read_csv(tmp_path / "pretext.csv"):
        extra = read_json(Path(p["run_dir"]) / "metrics.json")["extra"]
        assert float(p["test_mse"]) == pytest.approx(extra["masked_reconstruction/test_mse"])
    assert (tmp_path / "self_supervised.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("override,key", [("data.n_train=100", "data.n_train"),
                                          ("regularizer=[weight_decay]", "regularizer"),
                                          ("extra.labels=[0]", "extra.labels")])
def test_the_experiment_refuses_settings_it_cannot_honour(compose_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid"):
        _experiment(compose_cfg, tmp_path, [override])
