"""Multi-task learning (Prince §9.3.6, Goodfellow et al. §7.7): the MNIST-1D generator's own
transformation parameters as auxiliary targets, checked against signals rebuilt from them; the
loss CE + λ·MSE(aux head, standardized targets) against the formula, values and gradients."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from regexp.data import mnist1d
from regexp.errors import ConfigError
from regexp.population.aux_heads import StackedHeads
from regexp.regularizers import REGULARIZERS
from regexp.regularizers.base import Context


def _rebuild(template, t_len, args, shift, scale, shear, padding):
    """One noise-free signal by the recipe of Greydanus (2020), from its four factors, with numpy's
    own linear interpolation (the generator uses scipy's)."""
    x = np.concatenate([template + 1e-8, np.zeros(int(padding))])
    n = args.template_len + args.padding[1]
    x = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x) * scale
    x = np.roll(x, int(shift))
    x = x - shear * np.linspace(-0.5, 0.5, n)
    return np.interp(np.linspace(0, 1, args.final_seq_length), np.linspace(0, 1, n), x)


def test_recorded_factors_rebuild_the_generated_signals():
    """With the generator's noise turned off a signal is a function of its template and the four
    factors: rebuilding all of them from the recorded factors gives the generated dataset."""
    from mnist1d.data import get_dataset_args, get_templates, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.corr_noise_scale, args.iid_noise_scale = 60, 3, 0.0, 0.0
    with mnist1d._recorded_draws() as draws:
        d = make_dataset(args)
    f = mnist1d.factors_from_draws(draws, args, 60).numpy().astype(np.float64)
    assert f[:, 0].min() >= 0 and f[:, 0].max() < args.max_translation and len(set(f[:, 0])) > 10
    templates = get_templates()["x"]
    y = np.concatenate([d["y"], d["y_test"]])
    raw = np.stack([_rebuild(templates[c], 12, args, *row) for c, row in zip(y, f)])
    rebuilt = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(rebuilt, np.concatenate([d["x"], d["x_test"]]), atol=1e-5)
    # the recording changes nothing: the same seed without it makes the same signals
    np.testing.assert_array_equal(make_dataset(args)["x"], d["x"])


def test_generating_a_set_writes_its_factors_beside_it(tmp_path):
    """A fresh cache gets its factors from the same generation (no second one): they equal the
    factors recorded from a separate generation with the same settings."""
    from mnist1d.data import get_dataset_args, make_dataset

    x, *_ = mnist1d._generate(40, 5, 0.75, tmp_path / "f.pt")
    saved = torch.load(tmp_path / "f.pt", weights_only=True)
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = 40, 5, 0.75
    with mnist1d._recorded_draws() as draws:
        make_dataset(args)
    f = mnist1d.factors_from_draws(draws, args, 40)
    assert x.shape == (30, 1, 40) and torch.equal(saved["train"], f[:30]) and torch.equal(saved["test"], f[30:])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.trunk(x.flatten(1))))


@pytest.fixture
def setup(monkeypatch):
    """A generated 'source' of 30 signals with known factors; the run's data a selection of them."""
    g = torch.Generator().manual_seed(0)
    x_src, f_src = torch.randn(30, 1, 3, generator=g), torch.rand(30, 4, generator=g) * 10
    monkeypatch.setattr(mnist1d, "load_mnist1d_factors", lambda cfg: (x_src, f_src, x_src[:0], f_src[:0]))
    train, val = torch.tensor([7, 2, 19, 4, 11, 25, 0, 13]), torch.tensor([3, 29, 8])
    data = SimpleNamespace(x_train=x_src[train], y_train=torch.arange(8) % 4, x_val=x_src[val],
                           y_val=torch.tensor([0, 1, 2]))
    ctx = Context(4, 8, torch.device("cpu"), data=data, data_cfg=OmegaConf.create({"name": "mnist1d"}))
    return ctx, f_src, train, val


def make(ctx, **kw):
    cls = REGULARIZERS["multi_task"]
    return cls(OmegaConf.structured(cls.Config(**kw)), ctx)


def test_targets_follow_the_split_and_the_loss_is_ce_plus_lambda_mse(setup):
    ctx, f_src, train, _ = setup
    torch.manual_seed(0)
    model = Net()
    reg = make(ctx, lam=0.7, targets=["scale", "shift"])
    reg.attach(model)
    assert torch.equal(reg.train_targets, f_src[train][:, [1, 0]])  # each row's own factors, in target order
    idx = torch.tensor([5, 1, 6])
    xb, yb = ctx.data.x_train[idx], ctx.data.y_train[idx]
    logits = model(xb)
    loss = F.cross_entropy(logits, yb)
    # the term as the population computes it: the member's head stacked (aux_heads.py), on the
    # features its output layer read and the batch's rows of its standardized targets
    heads = StackedHeads([reg], [torch.arange(5)], 5, lambda params: None, torch.device("cpu"))
    heads.idx = idx.view(1, -1)
    term = heads.term(reg._features.unsqueeze(0), SimpleNamespace(lam=torch.tensor([0.7])))
    assert term.shape == (1,)
    total = loss + term[0]
    # by hand: standardize with the training rows' mean and (unbiased) std, linear head on the
    # features the output layer reads, mean squared error over batch and targets
    f = f_src[train][:, [1, 0]].double()
    z = ((f - f.mean(0)) / f.std(0))[idx]
    w = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    a = {n: p.detach().double().requires_grad_() for n, p in reg.aux.named_parameters()}
    h = torch.tanh(xb.flatten(1).double() @ w["trunk.weight"].T + w["trunk.bias"])
    out = h @ w["head.weight"].T + w["head.bias"]
    ce = -torch.log_softmax(out, 1)[torch.arange(3), yb].mean()
    aux = ((h @ a["weight"].T + a["bias"] - z) ** 2).sum() / (3 * 2)
    expected = ce + 0.7 * aux
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    expected.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), w[n].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(heads.params[0].grad[0].double(), a["weight"].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(heads.params[1].grad[0, 0].double(), a["bias"].grad, rtol=1e-4, atol=1e-6)
    assert reg.param_groups()[0]["params"] == list(reg.aux.parameters())


def test_signals_not_from_the_generator_and_bad_targets_are_refused(setup, compose_cfg):
    from regexp.config import validate

    ctx, *_ = setup
    ctx.data.x_train = ctx.data.x_train + 1e-3
    with pytest.raises(ConfigError, match="8 training signals are not among the generated MNIST-1D"):
        make(ctx).attach(Net())
    cfg = compose_cfg(["regularizer=[multi_task]", "regularizer.multi_task.targets=[shift,colour]"])
    with pytest.raises(ConfigError, match=r"regularizer.multi_task.targets=\['shift', 'colour'\] is invalid: "
                                          "expected a non-empty list of distinct factors from shift, scale"):
        validate(cfg)


QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0",
         "data.n_train=60", "model.width=16", "trainer.epochs=2", "trainer.batch_size=20"]


def test_at_lambda_zero_a_run_equals_the_single_task_run(compose_cfg, tmp_path):
    from conftest import read_scalars
    from regexp.train.trainer import train

    torch.set_num_threads(1)
    # bitwise, so one step form for both: tanh units (a relu run without a penalty takes the
    # hand-written step, the one with it autograd: equal up to rounding)
    single = train(compose_cfg([*QUICK, "model.activation=tanh"]), tmp_path / "single")
    zero = train(compose_cfg([*QUICK, "model.activation=tanh", "regularizer=[multi_task]",
                              "regularizer.multi_task.lam=0"]), tmp_path / "zero")
    assert zero["final"] == single["final"]  # the auxiliary head takes no part in the network itself
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("single", "zero"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v == 0 for _, v in read_scalars(tmp_path / "zero")["penalty/multi_task"])


def test_experiment_sweeps_lambda_and_writes_its_table_and_figure(compose_cfg, tmp_path):
    import regexp.experiments  # noqa: F401  (registers the tasks)
    from conftest import read_scalars
    from regexp.sweep import read_csv
    from regexp.tasks import TASKS
    from regexp.train.io import read_json

    overrides = ["+experiment=multi_task", "sweep.params={regularizer.multi_task.lam:[0.0,2.0],data.n_train:[60]}",
                 "sweep.seeds=[0]", *QUICK[:4],
                 "model.width=16", "trainer.epochs=2", "trainer.eval_every=1", "trainer.batch_size=20"]
    cfg = compose_cfg(overrides)
    torch.set_num_threads(1)
    assert TASKS[cfg.task](cfg, tmp_path, overrides, False)["status"] == "completed"
    rows = read_csv(tmp_path / "results.csv")
    assert sorted(float(r["regularizer.multi_task.lam"]) for r in rows) == [0.0, 2.0]
    assert all(r["status"] == "completed" and r["data.n_train"] == "60" for r in rows)
    assert (tmp_path / "multi_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [zero], [two] = (list(tmp_path.glob(f"*lam={lam}*/metrics.json")) for lam in ("0.0", "2.0"))
    assert read_json(two)["final"] != read_json(zero)["final"]
    assert -1 < read_json(two)["extra"]["multi_task/val_r2_shift"] < 1
    penalty = [v for _, v in read_scalars(two.parent)["penalty/multi_task"]]
    assert len(penalty) == 2 and all(0 < v < 10 for v in penalty)  # λ·MSE of standardized targets: ≈ λ at first
