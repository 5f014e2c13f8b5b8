"""Parameter tying (Goodfellow et al. §7.9): Ω = λ‖w − w_ref‖² toward a finished run's weights,
matched by name and shape, against the formula; the refusals; ``+experiment=parameter_tying``
end to end (CSV and PNG whose numbers are those of its runs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from regexp.errors import ConfigError
from regexp.regularizers import REGULARIZERS
from regexp.regularizers.base import Context

QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Tiny(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def tying(**kw):
    cls = REGULARIZERS["parameter_tying"]
    return cls(OmegaConf.structured(cls.Config(**kw)), Context(num_classes=3, n_train=20, device=torch.device("cpu")))


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    state = {**model.state_dict(), "extra.weight": torch.ones(2, 2)}  # a tensor this model lacks: ignored
    torch.save(state, tmp_path / "model.pt")
    return model


def test_penalty_and_gradient_equal_the_formula(tmp_path, source):
    torch.manual_seed(1)
    model = Tiny()
    reg = tying(lam=0.3, run_dir=str(tmp_path))
    reg.attach(model)
    w = {n: p.detach().numpy().astype(np.float64) for n, p in model.named_parameters()}
    ref = {n: t.numpy().astype(np.float64) for n, t in source.state_dict().items()}
    expected = 0.3 * sum(((w[n] - ref[n]) ** 2).sum() for n in w)
    omega = reg.penalty(model)
    assert omega.item() == pytest.approx(expected, rel=1e-6)
    omega.backward()
    for n, p in model.named_parameters():  # ∂Ω/∂w = 2λ(w − w_ref)
        np.testing.assert_allclose(p.grad.numpy(), 2 * 0.3 * (w[n] - ref[n]), rtol=1e-5, atol=1e-7)
    report = reg.report(model, {}, None)
    assert report["parameter_tying/tied_tensors"] == 4 and report["parameter_tying/free_tensors"] == 0
    assert report["parameter_tying/distance_to_reference"] == pytest.approx(np.sqrt(expected / 0.3), rel=1e-5)


def test_only_tensors_of_the_same_name_and_shape_are_tied(tmp_path, source):
    model = Tiny(classes=5)  # the head for another number of classes: same names, other shapes
    reg = tying(lam=1.0, run_dir=str(tmp_path))
    reg.attach(model)
    assert reg.tied == ["body.bias", "body.weight"] and reg.free == ["head.bias", "head.weight"]
    reg.penalty(model).backward()
    assert model.head.weight.grad is None and model.head.bias.grad is None
    expected = 2 * (model.body.weight.detach() - source.body.weight.detach())
    torch.testing.assert_close(model.body.weight.grad, expected)
    r = reg.report(model, {}, None)
    assert (r["parameter_tying/tied_tensors"], r["parameter_tying/tied_params"]) == (2, 4 * 6 + 6)


def test_missing_corrupt_or_unmatched_reference_is_refused_naming_the_path(tmp_path, source):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"regularizer.parameter_tying.run_dir='{missing}' is invalid: "
                                          f"{missing}/model.pt does not exist"):
        tying(run_dir=str(missing)).attach(Tiny())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=f"{bad}/model.pt: corrupt or truncated model file"):
        tying(run_dir=str(bad)).attach(Tiny())
    other = nn.Module()
    other.trunk = nn.Linear(4, 6)
    with pytest.raises(ConfigError, match=f"its model.pt \\({tmp_path}/model.pt\\) shares no tensor of matching "
                                          "name and shape"):
        tying(run_dir=str(tmp_path)).attach(other)


@pytest.mark.parametrize("name", ["parameter_tying"])  # multi_task trains in populations
def test_population_engine_refuses_the_new_regularizers(compose_cfg, name):
    from regexp.population.compat import incompatibility

    cfg = compose_cfg([f"regularizer=[{name}]"])
    assert incompatibility(cfg).startswith(f"regularizer {name} (population supports")


def test_experiment_trains_source_scratch_transfer_and_tying_and_reports_their_numbers(compose_cfg, tmp_path):
    import regexp.experiments  # noqa: F401  (registers the task)
    from regexp.config import validate
    from regexp.sweep import read_csv
    from regexp.tasks import TASKS
    from regexp.train.io import read_json

    overrides = ["+experiment=parameter_tying", "data.n_train=40", "trainer.epochs=2", "trainer.eval_every=1",
                 "extra.source_epochs=1", "extra.source_n_train=200", "extra.lams=[3.0]", "extra.seeds=[0,1]",
                 "trainer.batch_size=20", "model.width=16", *QUICK]
    cfg = compose_cfg(overrides)
    validate(cfg)
    torch.set_num_threads(1)
    assert TASKS[cfg.task](cfg, tmp_path, overrides, False)["status"] == "completed"
    rows = read_csv(tmp_path / "results.csv")
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, s) for v in ("source", "scratch", "transfer", "tying") for s in ("0", "1"))
    for r in rows:  # every number is its run's
        final = read_json(f"{r['run_dir']}/metrics.json")["final"]
        assert float(r["test_error"]) == pytest.approx(1 - final["test_acc"])
    tied = next(r for r in rows if r["variant"] == "tying" and r["seed"] == "1")
    m = read_json(f"{tied['run_dir']}/metrics.json")
    assert m["config"]["regularizer"]["parameter_tying"]["lam"] == 3.0
    assert m["config"]["regularizer"]["transfer"]["run_dir"].endswith("source/seed=1")
    assert m["extra"]["parameter_tying/tied_tensors"] == 6  # every layer of the MLP: same task, same shapes
    summary = read_csv(tmp_path / "summary.csv")
    tr = next(r for r in summary if r["variant"] == "transfer")
    errs = [float(r["test_error"]) for r in rows if r["variant"] == "transfer"]
    assert float(tr["test_error_mean"]) == pytest.approx(np.mean(errs))
    assert float(tr["test_error_std"]) == pytest.approx(np.std(errs, ddof=1))
    assert (tmp_path / "tying.png").read_bytes()[:8] == PNG_MAGIC
