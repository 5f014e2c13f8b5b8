"""PGD evaluation (Madry et al. 2018) and the linearity argument of adversarial examples
(Goodfellow et al. 2015, Goodfellow DL §7.13): PGD on a linear model finds ε·sign(w) and moves
the score by ε‖w‖₁; ε = 0 changes nothing; the report and ``+experiment=adversarial``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.experiments.adversarial import linear_model
from regexp.regularizers.adversarial import pgd
from regexp.sweep import read_csv
from regexp.tasks import TASKS
from regexp.train.io import load_tensors

QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0"]


@pytest.mark.parametrize("steps, alpha", [(1, 0.3), (10, 0.025), (4, 0.1)])
def test_pgd_on_a_linear_model_reaches_eps_sign_w(steps, alpha):
    """Logits (0, wᵀx), label 0: the loss rises with wᵀx, so the worst x' in the L∞ ball is
    x + ε·sign(w) and the score moves by ε‖w‖₁. Any steps·α >= ε reach that corner."""
    w = torch.tensor([0.5, -2.0, 1.0, -0.25, 3.0])
    x = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    eps = 0.1
    x_adv = pgd(linear_model(w), x, torch.tensor([0]), eps, steps, alpha)
    torch.testing.assert_close(x_adv, x + eps * torch.sign(w))
    torch.testing.assert_close((x_adv - x) @ w, torch.tensor([eps * w.abs().sum().item()]))


def test_pgd_stays_in_the_ball_and_short_steps_stop_short():
    """α·steps < ε: each step moves every coordinate by exactly α (no projection yet)."""
    w = torch.tensor([1.0, -1.0, 2.0])
    x = torch.zeros(1, 3)
    x_adv = pgd(linear_model(w), x, torch.tensor([0]), 0.5, 3, 0.1)
    torch.testing.assert_close(x_adv, 0.3 * torch.sign(w)[None])


def test_pgd_with_eps_zero_returns_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    assert torch.equal(pgd(model, x, y, 0.0, 5, 0.1), x)


def test_report_pgd_matches_clean_at_eps_zero_and_saves_examples(compose_cfg, tmp_path):
    from regexp.train.trainer import train

    torch.set_num_threads(1)
    cfg = compose_cfg(["regularizer=[adversarial]", "regularizer.adversarial.mix=0", "regularizer.adversarial.eps=0",
                       "regularizer.adversarial.pgd_steps=3", "regularizer.adversarial.examples=4",
                       "data.n_train=100", "trainer.epochs=1", *QUICK])
    extra = train(cfg, tmp_path)["extra"]
    assert extra["adversarial/pgd_test_acc"] == extra["adversarial/clean_test_acc"]
    assert extra["adversarial/pgd_test_loss"] == pytest.approx(extra["adversarial/clean_test_loss"])
    assert (extra["adversarial/pgd_eps"], extra["adversarial/pgd_steps"]) == (0.0, 3)
    saved = load_tensors(tmp_path / "adversarial_examples.pt", "examples", "")
    assert saved["clean"].shape == saved["pgd"].shape == (4, 1, 40)
    assert torch.equal(saved["clean_pred"], saved["pgd_pred"])


@pytest.mark.parametrize("key, value", [("pgd_steps", -1), ("pgd_step_size", 0.0), ("pgd_eps", -0.1), ("examples", -2)])
def test_bad_pgd_settings_are_refused(compose_cfg, key, value):
    cfg = compose_cfg(["regularizer=[adversarial]", f"regularizer.adversarial.{key}={value}"])
    with pytest.raises(ConfigError, match=rf"regularizer.adversarial.{key}={value} is invalid"):
        validate(cfg)


def test_experiment_measures_the_linearity_and_the_attacks(compose_cfg, tmp_path):
    import regexp.experiments  # noqa: F401  (registers the task)

    overrides = ["data.n_train=100", "trainer.epochs=1", "extra.seeds=[0]", "extra.dims=[4,64]",
                 "extra.linear_seeds=2", "extra.eps_list=[0.0,0.2]", "regularizer.adversarial.pgd_steps=2",
                 "logger.tensorboard=false", *QUICK]
    cfg = compose_cfg(["+experiment=adversarial", *overrides])
    validate(cfg)
    torch.set_num_threads(1)
    assert TASKS[cfg.task](cfg, tmp_path, overrides, False)["status"] == "completed"
    for r in read_csv(tmp_path / "linearity.csv"):
        # 2 steps of 2.5·ε/2 reach the corner: the change is ε‖w‖₁ exactly (float32)
        assert float(r["pgd_change"]) == pytest.approx(float(r["eps_l1_norm_w"]), rel=1e-5)
        assert float(r["pgd_linf"]) == pytest.approx(0.1)
    robust = read_csv(tmp_path / "robustness.csv")
    runs = {r["variant"]: r for r in read_csv(tmp_path / "results.csv")}
    for r in robust:
        if float(r["eps"]) == 0:  # no perturbation: the clean accuracy of the run
            assert float(r["pgd_test_acc"]) == pytest.approx(float(runs[r["variant"]]["clean_test_acc"]))
    assert {r["variant"] for r in robust} == {"standard", "fgsm"}
    for name in ("linearity", "robustness", "examples"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
