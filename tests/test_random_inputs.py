"""Random inputs (Zhang et al. 2017): what ``data.random_inputs`` puts in the training set, that
a seed fixes it, that the test set is left alone (or, for shuffled pixels, permuted the same
way), the config check, the population engine, and ``+experiment=memorization`` end to end."""
from __future__ import annotations

import statistics

import pytest
import torch

from regexp.config import validate
from regexp.data import load_data
from regexp.errors import ConfigError
from regexp.sweep import read_csv
from regexp.tasks import TASKS
from regexp.train.io import read_json

QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def loaded(compose_cfg):
    """The real data set and each mode's, for seeds 0 and 1 (MNIST-1D defaults: 3600 training signals)."""
    def get(mode, seed=0):
        return load_data(compose_cfg([f"data.random_inputs={mode}"]).data, seed)
    return {(m, s): get(m, s) for m in ("none", "gaussian", "random_pixels", "shuffled_pixels") for s in (0, 1)}


def _same_except_train_inputs(a, b):
    for name in ("y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_gaussian_inputs_match_each_features_mean_and_std_and_nothing_else(loaded):
    real, fake = loaded[("none", 0)], loaded[("gaussian", 0)]
    _same_except_train_inputs(real, fake)  # the labels, validation and test sets are the real ones
    x, z = real.x_train.flatten(1), fake.x_train.flatten(1)
    n = len(x)
    assert z.shape == x.shape
    # feature by feature, the sample moments of n draws of N(mu_j, sigma_j^2): within 5 standard errors
    se_mean = 5 * x.std(0) / n ** 0.5
    assert ((z.mean(0) - x.mean(0)).abs() <= se_mean).all()
    assert ((z.std(0) / x.std(0) - 1).abs() <= 5 / (2 * n) ** 0.5).all()
    # and independent of the real signal: the correlation of the two over all entries is ~0 (|r| < 5/sqrt(N))
    zc, xc = z - z.mean(0), x - x.mean(0)
    r = (zc * xc).sum() / (zc.norm() * xc.norm())
    assert abs(r.item()) < 5 / x.numel() ** 0.5
    # neighbouring positions of a real signal are strongly correlated, of a Gaussian one not
    assert torch.corrcoef(x[:, 10:12].T)[0, 1] > 0.5 and abs(torch.corrcoef(z[:, 10:12].T)[0, 1]) < 5 / n ** 0.5


def test_random_pixels_permute_each_signal_on_its_own(loaded):
    real, fake = loaded[("none", 0)], loaded[("random_pixels", 0)]
    _same_except_train_inputs(real, fake)
    x, z = real.x_train.flatten(1), fake.x_train.flatten(1)
    assert torch.equal(z.sort(1).values, x.sort(1).values)  # each row keeps exactly its values
    assert (z != x).any(1).float().mean() > 0.99  # but (almost) none their order
    # not one permutation for all: the positions of each row's maximum are spread, not shifted alike
    shift = (z.argmax(1) - x.argmax(1)) % z.shape[1]
    assert len(torch.unique(shift)) > 30


def test_shuffled_pixels_apply_one_permutation_to_every_split(loaded):
    real, fake = loaded[("none", 0)], loaded[("shuffled_pixels", 0)]
    x, z = real.x_train.flatten(1), fake.x_train.flatten(1)
    # the source column of each new column, found by equality (the columns are distinct)
    perm = torch.tensor([int(torch.nonzero((x == z[:, [j]]).all(0))[0]) for j in range(z.shape[1])])
    assert sorted(perm.tolist()) == list(range(z.shape[1])) and not torch.equal(perm, torch.arange(z.shape[1]))
    for split in ("val", "test"):
        assert torch.equal(getattr(fake, f"x_{split}").flatten(1), getattr(real, f"x_{split}").flatten(1)[:, perm])
    assert torch.equal(fake.y_train, real.y_train) and torch.equal(fake.y_test, real.y_test)


@pytest.mark.parametrize("mode", ["gaussian", "random_pixels", "shuffled_pixels"])
def test_a_seed_fixes_the_random_inputs(compose_cfg, loaded, mode):
    again = load_data(compose_cfg([f"data.random_inputs={mode}"]).data, 0)
    assert torch.equal(again.x_train, loaded[(mode, 0)].x_train)
    assert not torch.equal(loaded[(mode, 1)].x_train, loaded[(mode, 0)].x_train)
    # data.split_seed, when set, drives them instead of the run's seed
    pinned = compose_cfg([f"data.random_inputs={mode}", "data.split_seed=1"]).data
    assert torch.equal(load_data(pinned, 0).x_train, loaded[(mode, 1)].x_train)


def test_an_unknown_mode_is_refused_naming_the_key(compose_cfg):
    with pytest.raises(ConfigError, match=r"^data\.random_inputs='noise' is invalid: expected one of none, "
                                          r"gaussian, random_pixels, shuffled_pixels$"):
        validate(compose_cfg(["data.random_inputs=noise"]))


def test_population_members_may_differ_in_random_inputs(compose_cfg, tmp_path):
    """One population, members with different random inputs: each equals its lone run."""
    from test_population import _assert_same_run, _pop_and_lone
    from regexp.population import use_population

    points = [{"data.random_inputs": m, "seed": s} for m, s in (("gaussian", 0), ("random_pixels", 1))]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, ["optimizer=sgd", "model.width=16", "trainer.epochs=1"],
                                    points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)


def test_memorization_experiment_writes_its_tables_from_its_runs(compose_cfg, tmp_path):
    import regexp.experiments  # noqa: F401  (registers the task)

    overrides = ["+experiment=memorization", "data.n_train=60", "trainer.epochs=15", "model.width=64", "optimizer.lr=0.01",
                 "trainer.batch_size=30", "extra.conditions=[true_labels,random_labels,gaussian]",
                 "extra.corruption=[0.0,0.5,1.0]", "extra.seeds=[0,1]", *QUICK]
    cfg = compose_cfg(overrides)
    validate(cfg)
    torch.set_num_threads(1)
    metrics = TASKS[cfg.task](cfg, tmp_path, overrides, False)
    # p = 0 is true_labels and p = 1 random_labels: 4 distinct points per seed, not 6
    assert metrics == {"status": "completed", "runs": 8, "failed": 0}
    rows = read_csv(tmp_path / "results.csv")
    assert [r["group"] for r in rows[::2]] == ["true_labels", "random_labels", "gaussian", "corruption=0",
                                              "corruption=0.5", "corruption=1"]
    for r in rows:
        run = read_json(tmp_path / r["run_dir"].split(str(tmp_path) + "/")[1] / "metrics.json")
        hist = run["history"]
        first = next((h["epoch"] for h in hist if h["train_acc"] == 1.0), "")
        assert r["epochs_to_zero_train_error"] == str(first)
        assert float(r["test_error"]) == pytest.approx(1 - run["final"]["test_acc"])
        d = run["config"]["data"]
        expected = {"true_labels": (0.0, "none"), "random_labels": (0.9, "none"), "gaussian": (0.0, "gaussian"),
                    "corruption=0": (0.0, "none"), "corruption=0.5": (0.45, "none"), "corruption=1": (0.9, "none")}
        assert (d["label_noise"], d["random_inputs"]) == expected[r["group"]]
    # the small net at a large lr fits 60 signals exactly within the 15 epochs, random labels too
    assert all(r["epochs_to_zero_train_error"] != "" for r in rows if r["group"] in ("true_labels", "random_labels"))
    noise = read_json(tmp_path / "data.label_noise=0.9,data.random_inputs=none,seed=0" / "label_noise.json")
    assert len(noise["indices"]) == round(0.9 * 60)
    # the summary holds the mean over seeds of the table's numbers
    summary = {r["group"]: r for r in read_csv(tmp_path / "summary.csv")}
    for g, s in summary.items():
        errs = [float(r["test_error"]) for r in rows if r["group"] == g]
        assert s["test_error"].startswith(f"{statistics.mean(errs):.3g} ± ")
    assert (tmp_path / "memorization.png").read_bytes()[:8] == PNG_MAGIC


def test_memorization_refuses_an_unknown_condition(compose_cfg, tmp_path):
    import regexp.experiments  # noqa: F401

    cfg = compose_cfg(["+experiment=memorization", "extra.conditions=[random_noise]", *QUICK])
    with pytest.raises(ConfigError, match=r"^extra\.conditions='random_noise' is invalid"):
        TASKS[cfg.task](cfg, tmp_path, [], False)
