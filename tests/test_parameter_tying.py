"""Parameter tying (Goodfellow et al. §7.9): Ω = λ‖w − w_ref‖² toward a finished run's weights,
matched by name and shape, against the formula; joint mode (a partner model trained in the same
run, both gradients against the formula, λ = 0 bitwise the lone run, the strongest stable λ
keeping both together, resume; in a population: tests/test_population_joint_tying.py);
reference tying in a population against lone runs; the refusals; ``+experiment=parameter_tying``
end to end (CSV and PNG whose numbers are those of its runs)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from regexp.errors import ConfigError
from regexp.population.partner import StackedPartners
from regexp.population.stacked_mlp import StackedMLP
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


def stacked_penalty(reg, model, lam):
    """Ω of a population of one member as the engine's LossTerms forms it: ``population_hp``'s
    stacked references, then ``penalty_of`` on the stacked parameters. Returns Ω, (1,), and
    the stacked parameters by name (their gradients are the member's)."""
    named = [(n, p.detach().unsqueeze(0).requires_grad_()) for n, p in model.named_parameters()]
    refs = reg.population_hp([reg], named, lambda per_member, like: torch.stack(per_member))
    return reg.penalty_of([p for _, p in named], SimpleNamespace(lam=torch.tensor([lam]), **refs), True), dict(named)


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
    omega, stacked = stacked_penalty(reg, model, 0.3)
    assert omega.shape == (1,) and omega.item() == pytest.approx(expected, rel=1e-6)
    omega.backward()
    for n, p in stacked.items():  # ∂Ω/∂w = 2λ(w − w_ref)
        np.testing.assert_allclose(p.grad[0].numpy(), 2 * 0.3 * (w[n] - ref[n]), rtol=1e-5, atol=1e-7)
    report = reg.report(model, {}, None)
    assert report["parameter_tying/tied_tensors"] == 4 and report["parameter_tying/free_tensors"] == 0
    assert report["parameter_tying/distance_to_reference"] == pytest.approx(np.sqrt(expected / 0.3), rel=1e-5)


def test_only_tensors_of_the_same_name_and_shape_are_tied(tmp_path, source):
    model = Tiny(classes=5)  # the head for another number of classes: same names, other shapes
    reg = tying(lam=1.0, run_dir=str(tmp_path))
    reg.attach(model)
    assert reg.tied == ["body.bias", "body.weight"] and reg.free == ["head.bias", "head.weight"]
    omega, stacked = stacked_penalty(reg, model, 1.0)
    omega.backward()
    # a shape the reference does not match is weighted 0: no pull toward the zeros standing in for it
    assert torch.count_nonzero(stacked["head.weight"].grad) == 0 and torch.count_nonzero(stacked["head.bias"].grad) == 0
    expected = 2 * (model.body.weight.detach() - source.body.weight.detach())
    torch.testing.assert_close(stacked["body.weight"].grad[0], expected)
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


def test_population_engine_takes_joint_and_reference_tying(compose_cfg):
    from regexp.population.compat import MEMBER_KEYS, incompatibility
    from regexp.population.run import LONE_RUN, lone_run_record

    joint = compose_cfg(["regularizer=[parameter_tying]", f"{KEY}.mode=joint"])
    assert incompatibility(joint) is None
    assert lone_run_record(joint) == LONE_RUN  # a lone joint run: a population of one
    assert incompatibility(compose_cfg(["regularizer=[parameter_tying]", f"{KEY}.run_dir=/some/run"])) is None
    # each member's own partner: its λ and partner seed may differ inside one population
    assert {f"{KEY}.lam", f"{KEY}.partner_seed"} <= set(MEMBER_KEYS)


# ---------------------------------------------------------------- joint mode: two models trained together
KEY = "regularizer.parameter_tying"
JOINT = ["regularizer=[parameter_tying]", f"{KEY}.mode=joint", f"+{KEY}.partner_data.n_train=400",
         f"+{KEY}.partner_data.label_noise=0.3", "model.width=12", "data.n_train=100", "trainer.batch_size=50",
         *QUICK]


def test_joint_penalty_and_gradients_of_both_models_equal_the_formula(compose_cfg):
    from regexp.config import validate
    from regexp.data import load_data
    from regexp.train.trainer import build_initial_model

    cfg = compose_cfg(JOINT + [f"{KEY}.lam=0.7"])
    validate(cfg)
    data = load_data(cfg.data, cfg.seed)
    model, _, (reg,) = build_initial_model(cfg, data, torch.device("cpu"), None)
    reg.attach(model)
    partner = reg.partner
    assert len(reg.data.y_train) == 400  # partner_data.n_train
    a = {n: p.detach().double() for n, p in model.named_parameters()}
    b = {n: p.detach().double() for n, p in partner.named_parameters()}
    assert reg.tied == sorted(a) and not any(torch.equal(a[n], b[n]) for n in a)  # own initializations
    # the step's term as a population of one computes it (regexp/population/partner.py): the
    # partner's cross-entropy on its own batch plus λ Σ‖w_A − w_B‖²
    cpu = torch.device("cpu")
    net = StackedMLP([model], [12], 12, cfg.model.activation, cpu)
    member = SimpleNamespace(regs=[reg], cfg=cfg, width=12)
    partners = StackedPartners([member], net, 12, lambda params: None, cpu)
    order = torch.Generator()
    order.set_state(reg.order.get_state())
    partners.draw(50)
    xb, yb = partners.batch
    rows = torch.randperm(400, generator=order)[:50]  # the partner's own data, in its own order
    torch.testing.assert_close(xb[0], reg.x[rows].flatten(1))
    assert torch.equal(yb[0], reg.y[rows])
    term = partners.penalty(net)
    ce = F.cross_entropy(partner(reg.x[rows]).double(), reg.y[rows])
    tie = 0.7 * sum(((a[n] - b[n]) ** 2).sum() for n in a)
    assert term.shape == (1,) and term.item() == pytest.approx((ce + tie).item(), rel=1e-5)
    term.backward()
    ce_grads = dict(zip(b, torch.autograd.grad(F.cross_entropy(partner(reg.x[rows]), reg.y[rows]),
                                               list(partner.parameters()))))
    got_a = net.member_state(0, [p.grad for p in net.params])
    got_b = partners.net.member_state(0, [p.grad for p in partners.net.params])
    for n in a:  # A: 2λ(w_A − w_B); B: its cross-entropy's gradient − 2λ(w_A − w_B)
        torch.testing.assert_close(got_a[n].double(), 2 * 0.7 * (a[n] - b[n]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got_b[n].double(), ce_grads[n].double() - 2 * 0.7 * (a[n] - b[n]),
                                   rtol=1e-5, atol=1e-6)


def test_joint_lam_zero_leaves_a_its_lone_run_and_the_strongest_lam_keeps_a_and_b_together(compose_cfg, tmp_path,
                                                                                            monkeypatch):
    """λ = 0: A's update never reads B, so A ends bitwise as the untied lone run (SGD, float32).
    SGD with 4λη = 1 moves both to their mean every step (the difference d becomes
    −η(g_A − g_B)): A and B stay within a few percent of how far apart they end untied."""
    import regexp.population.run as population
    from regexp.population.engine import Options
    from regexp.train.trainer import train

    common = ["optimizer=sgd", "optimizer.lr=0.05", "trainer.epochs=3", "trainer.eval_every=3"]
    # bitwise: both train in a population of one, through autograd in the batched form, whatever
    # this machine measures as faster (a λ·0 term adds exactly 0 to A's gradient; weight_decay
    # with λ 0 keeps the untied twin off the hand-written step)
    monkeypatch.setattr(population, "Options", lambda: Options(loop_width=0))
    lone = train(compose_cfg(common + JOINT[4:] + ["regularizer=[weight_decay]", "regularizer.weight_decay.lam=0.0"]),
                 tmp_path / "lone")
    free = train(compose_cfg(common + JOINT + [f"{KEY}.lam=0.0"]), tmp_path / "free")
    assert lone["engine"] == free["engine"] == "population"
    tied = train(compose_cfg(common + JOINT + [f"{KEY}.lam=5.0"]), tmp_path / "tied")
    a_lone, a_free = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("lone", "free"))
    assert all(torch.equal(a_lone[k], a_free[k]) for k in a_lone)
    assert free["final"] == lone["final"]
    a, b = torch.load(tmp_path / "tied" / "model.pt", weights_only=True), torch.load(tmp_path / "tied" / "partner_model.pt", weights_only=True)
    dist = lambda x, y: sum((x[k] - y[k]).pow(2).sum() for k in x).sqrt().item()  # noqa: E731
    apart = free["extra"]["parameter_tying/distance_to_partner"]
    assert apart == pytest.approx(dist(a_free, torch.load(tmp_path / "free" / "partner_model.pt", weights_only=True)), rel=1e-5)
    assert tied["extra"]["parameter_tying/distance_to_partner"] == pytest.approx(dist(a, b), rel=1e-5)
    assert dist(a, b) < 0.05 * apart
    for run in (free, tied):  # the partner's own task: its accuracy on its own splits
        assert 0.0 <= run["extra"]["parameter_tying/partner_test_acc"] <= 1.0
        assert run["extra"]["parameter_tying/tied_tensors"] == 6


def test_joint_mode_refuses_partner_data_keys_the_data_config_lacks(compose_cfg):
    from regexp.config import validate

    with pytest.raises(ConfigError, match=f"{KEY}.partner_data.n_trian is not a key of data: expected one of name, "
                                          "n_train"):
        validate(compose_cfg(["regularizer=[parameter_tying]", f"{KEY}.mode=joint", f"+{KEY}.partner_data.n_trian=5"]))
    with pytest.raises(ConfigError, match=f"{KEY}.run_dir='' is invalid: expected the folder of a finished run"):
        validate(compose_cfg(["regularizer=[parameter_tying]"]))


# ---------------------------------------------------------------- reference mode in a population
def test_population_members_tied_to_a_reference_match_their_lone_runs(compose_cfg, tmp_path):
    """Member 0 (width 16) ties every tensor of the width-16 reference, member 1 (width 12) only
    the head's bias (the other shapes differ), each with its own λ; tolerance as in
    tests/test_population.py (float32: |a − b| <= 1e-5 + 1e-4·|b| after 2 epochs)."""
    from regexp.population import use_population
    from regexp.train.trainer import train
    from test_population import _assert_same_run, _pop_and_lone

    small = ["data.n_train=300", "trainer.batch_size=50"]
    train(compose_cfg(["trainer.epochs=1", "model.width=16", *small, *QUICK]), tmp_path / "ref")
    points = [{"model.width": 16, f"{KEY}.lam": 0.05, "seed": 0},
              {"model.width": 12, f"{KEY}.lam": 0.5, "seed": 1}]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, small + [
        "regularizer=[parameter_tying]", f"{KEY}.run_dir={tmp_path / 'ref'}"], points)
    assert use_population(base, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)  # includes penalty/parameter_tying and the distance
    assert [r["extra"]["parameter_tying/tied_tensors"] for r in pop] == [6, 1]


def test_experiment_trains_source_scratch_transfer_and_tying_and_reports_their_numbers(compose_cfg, tmp_path):
    import regexp.experiments  # noqa: F401  (registers the task)
    from regexp.config import validate
    from regexp.sweep import read_csv
    from regexp.tasks import TASKS
    from regexp.train.io import read_json

    overrides = ["+experiment=parameter_tying", "data.n_train=40", "trainer.epochs=2", "trainer.eval_every=1",
                 "extra.source_epochs=1", "extra.source_n_train=200", "extra.lams=[3.0]", "extra.seeds=[0,1]",
                 "extra.joint_lams=[0.5]", "trainer.batch_size=20", "model.width=16", *QUICK]
    cfg = compose_cfg(overrides)
    validate(cfg)
    torch.set_num_threads(1)
    assert TASKS[cfg.task](cfg, tmp_path, overrides, False)["status"] == "completed"
    rows = read_csv(tmp_path / "results.csv")
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, s) for v in ("source", "scratch", "transfer", "tying", "joint") for s in ("0", "1"))
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
    # the joint arm: a partner on the source data (200 examples, noisy labels) beside each target run,
    # as many steps as the source run took (1 epoch of 200 at batch 20 = 10 steps = 5 target epochs of 40)
    joint = next(r for r in rows if r["variant"] == "joint" and r["seed"] == "0")
    m = read_json(f"{joint['run_dir']}/metrics.json")
    tied_cfg = m["config"]["regularizer"]["parameter_tying"]
    assert (tied_cfg["mode"], tied_cfg["lam"], tied_cfg["partner_data"]) == (
        "joint", 0.5, {"n_train": 200, "label_noise": 0.5})
    assert m["epochs"] == 5 and "transfer" not in m["config"]["regularizer"]
    assert 0 <= m["extra"]["parameter_tying/partner_test_acc"] <= 1
    assert (Path(joint["run_dir"]) / "partner_model.pt").is_file()
    # the comparison: per-seed differences of test error against transfer and scratch
    comparison = read_csv(tmp_path / "comparison.csv")
    assert sorted((r["variant"], r["against"]) for r in comparison) == sorted(
        (v, o) for v in ("tying", "joint") for o in ("transfer", "scratch"))
    err = {(r["variant"], r["seed"]): float(r["test_error"]) for r in rows}
    c = next(r for r in comparison if (r["variant"], r["against"]) == ("joint", "transfer"))
    diffs = [err[("joint", s)] - err[("transfer", s)] for s in ("0", "1")]
    assert float(c["test_error_diff_mean"]) == pytest.approx(np.mean(diffs))
    assert float(c["test_error_diff_std"]) == pytest.approx(np.std(diffs, ddof=1))


def test_interrupted_joint_run_resumes_to_the_uninterrupted_one(compose_cfg, tmp_path, monkeypatch):
    """The partner's weights, optimizer state, data order and place in its own epoch (batches of
    30 from 400 examples: its epochs end elsewhere than A's) come back from the checkpoint. The
    lone run trains as a population of one (its loop asks the stop flag once per step and once
    after each epoch's end)."""
    import regexp.population.engine as engine
    import regexp.train.trainer as trainer
    from conftest import StopAfter

    overrides = JOINT + [f"{KEY}.lam=0.2", f"{KEY}.partner_batch_size=30", "trainer.epochs=3"]
    ref = trainer.train(compose_cfg(overrides), tmp_path / "ref")
    monkeypatch.setattr(engine, "StopFlag", lambda: StopAfter(3))  # after step 1 of epoch 2 (2 steps per epoch)
    assert trainer.train(compose_cfg(overrides), tmp_path / "run")["status"] == "interrupted"
    monkeypatch.undo()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"], ck["regularizers"][0]["step"]) == (1, 1, 3)
    resumed = trainer.train(compose_cfg(overrides + ["trainer.resume=true"]), tmp_path / "run")
    assert resumed["history"] == ref["history"] and resumed["extra"] == ref["extra"]
    for f in ("model.pt", "partner_model.pt"):
        a, b = torch.load(tmp_path / "run" / f, weights_only=True), torch.load(tmp_path / "ref" / f, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in b), f
