"""Probes of an ``ensemble`` run in the population: its K stacked slices measured as one model.

The former per-model loop measured an ensemble run's probes on its :class:`Ensemble` module as on
any model (``probes.measure(model)``): all K models' parameters one vector (model 0's, then model
1's ...), the loss the cross-entropy of the Ensemble's prediction ln((1/K) Σₖ softmax(zₖ)), margins
of that prediction. A run of the population (a population of one) must report those values on the
weights its model.pt holds: here the lone :class:`Ensemble` built from model.pt is measured by the
probes as that loop did, with the run's probe batch and a fresh generator (``probe.every=0``: the
end-of-run measurement is the generator's first), and the loss, norms and margins are also written
out in plain torch.

Stated tolerance (float32), as tests/test_population_probes.py states it: |a - b| <= 1e-6 + 1e-4·|b|
(the stacked forward changes only the summation order; loss differences lose digits to
cancellation). A member of a population of ensembles (differing lr, width, seed; the narrow one
padded) measures what its population of one does, within the same tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regexp.data import load_data
from regexp.models import build_model
from regexp.population import train_population, use_population
from regexp.probes.runner import build_probes
from regexp.regularizers.ensemble import Ensemble
from regexp.sweep import point_config, point_name
from regexp.train.trainer import train
from test_population_probes import ATOL, PROBES, RTOL, TINY, _assert_same_probes

K = 3
ENSEMBLE = ["regularizer=[ensemble]", f"regularizer.ensemble.components={K}"]
MLP = ["model.depth=2", "model.activation=tanh"]  # tanh: the padded block of the Hessian is not zero


def _lone_ensemble(cfg, run_dir) -> Ensemble:
    ds = load_data(cfg.data, cfg.seed)
    model = Ensemble([build_model(cfg.model, ds.input_shape, ds.num_classes)
                      for _ in range(int(cfg.regularizer.ensemble.components))])
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    return model


# the hessian's top eigenvalues from Lanczos or from power iteration (its own Rademacher starts)
@pytest.mark.parametrize("probe,extra", [("sharpness", []), ("hessian", []),
                                         ("hessian", ["probe.hessian.top_method=power", "probe.hessian.top_k=2"])],
                         ids=["sharpness", "hessian", "hessian-power"])
def test_an_ensemble_runs_probes_equal_its_ensemble_modules(compose_cfg, tmp_path, probe, extra):
    settings = [o for o in PROBES if o.startswith(f"probe.{probe}.") or o == "probe.batch_size=64"]
    cfg = compose_cfg(TINY + ENSEMBLE + MLP + [f"probe=[{probe}]", "probe.every=0"] + settings + extra
                      + ["model.width=12", "optimizer=adam", "seed=3"])
    got = train(cfg, tmp_path, [])
    assert got["status"] == "completed" and [r["epoch"] for r in got["probe_history"]] == [2]
    model = _lone_ensemble(cfg, tmp_path).eval()
    x_train, y_train = load_data(cfg.data, cfg.seed).split("train")
    probes = build_probes(cfg.probe, x_train, y_train, int(cfg.seed), int(cfg.trainer.eval_batch_size))
    want = probes.measure(model)  # the former loop's call on the Ensemble module
    assert got["probes"].keys() == want.keys()
    for k in want:
        assert got["probes"][k] == pytest.approx(want[k], rel=RTOL, abs=ATOL), k
    if probe != "sharpness":
        return
    # written out: the Ensemble's prediction, all K models' parameters as one vector
    with torch.no_grad():
        lp = torch.stack([F.log_softmax(m(probes.x), 1) for m in model.members])
        loss = F.cross_entropy(torch.logsumexp(lp, 0) - math.log(K), probes.y).item()
        params = list(model.parameters())
        l2 = math.sqrt(sum(p.double().pow(2).sum().item() for p in params))
        product = math.prod(p.double().norm().item() for p in params if p.dim() >= 2)
        out = torch.logsumexp(torch.stack([F.log_softmax(m(x_train), 1) for m in model.members]), 0)
        correct = out.gather(1, y_train[:, None]).squeeze(1)
        margin = correct - out.scatter(1, y_train[:, None], -math.inf).amax(1)
    assert len([p for p in params if p.dim() >= 2]) == 3 * K
    assert got["probes"]["sharpness/loss"] == pytest.approx(loss, rel=RTOL, abs=ATOL)
    assert got["probes"]["norm/l2"] == pytest.approx(l2, rel=RTOL)
    assert got["probes"]["norm/frobenius_product"] == pytest.approx(product, rel=RTOL)
    assert got["probes"]["margin/nonpositive"] == pytest.approx(float((margin <= 0).double().mean()), abs=1e-9)
    assert got["probes"]["margin/q50"] == pytest.approx(float(torch.quantile(margin.double(), 0.5)), rel=1e-3, abs=1e-4)


# three ensembles of differing lr, width (12 padded to 16) and seed as one population; early
# stopping (lone probes on the stopped run's Ensemble module) in the second case
@pytest.mark.parametrize("extra,points", [
    (["optimizer=adam"], [{"seed": 0, "optimizer.lr": 0.003, "model.width": 12},
                          {"seed": 1, "optimizer.lr": 0.001, "model.width": 16},
                          {"seed": 2, "optimizer.lr": 0.002, "model.width": 16}]),
    (["regularizer=[ensemble,early_stopping]", "optimizer=momentum", "trainer.epochs=3",
      "regularizer.early_stopping.monitor=val_loss", "regularizer.early_stopping.min_delta=10.0"],
     [{"seed": 0, "regularizer.early_stopping.patience": 1, "model.width": 12},
      {"seed": 1, "regularizer.early_stopping.patience": 5, "model.width": 16}]),
    # a CNN's K models, batch norm on each model's running statistics, channels padded
    (["model=cnn", "model.norm=batch", "model.kernel_size=3", "model.activation=tanh", "optimizer=momentum"],
     [{"seed": 0, "model.channels": [3, 4]}, {"seed": 1, "optimizer.lr": 0.02, "model.channels": [4, 5]}]),
    (["model=transformer", "model.depth=1", "model.heads=2", "model.mlp_ratio=2.0", "optimizer=momentum"],
     [{"seed": 0, "model.embed_dim": 8}, {"seed": 1, "optimizer.lr": 0.02, "model.embed_dim": 6}]),
    (["model=gru", "optimizer=adam"], [{"seed": 0}, {"seed": 1, "optimizer.lr": 0.003}]),
], ids=["adam-widths", "early-stopping", "cnn-batch-norm", "transformer", "gru"])
def test_ensemble_members_probes_equal_each_alone(compose_cfg, tmp_path, extra, points):
    mlp = [] if any(v.startswith("model=") for v in extra) else MLP
    base = compose_cfg(TINY + ENSEMBLE + mlp + PROBES + extra)
    assert use_population(base, points)  # nothing refused
    pop = train_population(base, points, tmp_path / "pop")
    lone = [train(point_config(base, p), tmp_path / "lone" / point_name(p), [], sweep=True) for p in points]
    for p, a, b in zip(points, pop, lone):
        assert a["status"] == b["status"] == "completed"
        assert a.get("stopped_epoch") == b.get("stopped_epoch")
        epochs = [r["epoch"] for r in b["probe_history"]]
        _assert_same_probes(tmp_path, p, a, b, epochs)
    # the first stopped at epoch 2 (its last probe the stopped one), the other ran on
    if "early_stopping" in base.regularizer:
        assert [[r["epoch"] for r in m["probe_history"]] for m in pop] == [[1, 2], [1, 2, 3]]


def test_an_interrupted_ensemble_population_resumes_to_the_same_probes(compose_cfg, tmp_path, monkeypatch):
    # each run's probe generator and history travel in its (the Ensemble's) checkpoint
    from test_population_probes import assert_resumes_to_the_same_probes

    base = compose_cfg(TINY + ENSEMBLE + MLP + PROBES + ["trainer.epochs=3", "trainer.batch_size=100",
                                                         "optimizer=adam"])
    assert_resumes_to_the_same_probes(base, tmp_path, monkeypatch)
