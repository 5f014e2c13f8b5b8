"""Tangent propagation: the penalty and its gradient against hand-written formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import lone_batch
from regexp.errors import ConfigError
from regexp.models.mlp import MLP
from regexp.population import use_population
from regexp.regularizers import REGULARIZERS
from regexp.regularizers.base import Context


def make(input_shape, **cfg):
    schema = OmegaConf.structured(REGULARIZERS["tangent_prop"].Config)
    return REGULARIZERS["tangent_prop"](OmegaConf.merge(schema, cfg), Context(10, 100, torch.device("cpu"),
                                                                             input_shape))


def penalty(reg, model, x):
    """The regularizer's ``batch_penalty_of`` on one model's batch, with the config's values."""
    return reg.batch_penalty_of(lone_batch(model, None, x, None), reg.cfg, False)


def shift_tangent_1d(x: np.ndarray) -> np.ndarray:
    """(x[j−1] − x[j+1]) / 2, each end repeating its edge value."""
    padded = np.concatenate([x[..., :1], x, x[..., -1:]], -1)
    return (padded[..., :-2] - padded[..., 2:]) / 2


def scale_tangent_1d(x: np.ndarray, delta: float) -> np.ndarray:
    """x read at (t − c)/(1 ± δ) + c by linear interpolation (edges clamped), central difference."""
    length = x.shape[-1]
    t, c = np.arange(length), (length - 1) / 2
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        up, down = (np.interp((t - c) / s + c, t, x[idx]) for s in (1 + delta, 1 - delta))
        out[idx] = (up - down) / 2
    return out


def linear_penalty_and_grad(w: np.ndarray, ts, lam: float):
    """λ/B Σᵢ Σ_v ‖W vᵢ‖² and its gradient 2λ/B Σᵢ Σ_v (W vᵢ) vᵢᵀ (a linear model's J is W)."""
    b = len(ts[0])
    flat = [t.reshape(b, -1) for t in ts]
    value = lam / b * sum(((v @ w.T) ** 2).sum() for v in flat)
    grad = 2 * lam / b * sum((v @ w.T).T @ v for v in flat)
    return value, grad


@pytest.mark.parametrize("names", [["shift"], ["scale"], ["shift", "scale"]])
def test_linear_model_1d_matches_w_times_tangent(names):
    torch.manual_seed(0)
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    model = MLP(24, 3, width=1, depth=0).double()  # logits = W x + b
    reg = make((2, 12), lam=0.3, tangents=names, scale_step=0.1)
    value = penalty(reg, model, x)
    value.backward()
    xs = x.numpy()
    ts = [shift_tangent_1d(xs) if n == "shift" else scale_tangent_1d(xs, 0.1) for n in names]
    want, grad = linear_penalty_and_grad(model.head.weight.detach().numpy(), ts, 0.3)
    assert value.item() == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(model.head.weight.grad.numpy(), grad, rtol=1e-10, atol=1e-12)
    assert model.head.bias.grad is None or torch.all(model.head.bias.grad == 0)  # J does not see b


def test_linear_model_images_two_shift_tangents():
    torch.manual_seed(1)
    x = torch.randn(4, 1, 5, 6, dtype=torch.float64)
    model = MLP(30, 3, width=1, depth=0).double()
    reg = make((1, 5, 6), lam=2.0)
    value = penalty(reg, model, x)
    value.backward()
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))  # zero padding, as the random crop
    horizontal = (xp[:, :, 1:-1, :-2] - xp[:, :, 1:-1, 2:]) / 2
    vertical = (xp[:, :, :-2, 1:-1] - xp[:, :, 2:, 1:-1]) / 2
    want, grad = linear_penalty_and_grad(model.head.weight.detach().numpy(), [horizontal, vertical], 2.0)
    assert value.item() == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(model.head.weight.grad.numpy(), grad, rtol=1e-10, atol=1e-12)


def test_nonlinear_model_agrees_with_forward_mode_jvp():
    """The double-backward J·v and its parameter gradient equal torch.func.jvp's."""
    from torch.func import functional_call, jvp

    torch.manual_seed(2)
    x = torch.randn(6, 1, 10, dtype=torch.float64)
    model = MLP(10, 4, width=7, depth=2, act="tanh").double()
    reg = make((1, 10), lam=0.5)
    value = penalty(reg, model, x)
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True, materialize_grads=True)
    v = torch.from_numpy(shift_tangent_1d(x.numpy()))
    params = dict(model.named_parameters())
    _, jv = jvp(lambda inp: functional_call(model, params, (inp,)), (x,), (v,))
    want = 0.5 * jv.pow(2).sum() / len(x)
    want_grads = torch.autograd.grad(want, list(params.values()), allow_unused=True, materialize_grads=True)
    assert value.item() == pytest.approx(want.item(), rel=1e-10)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"tangents=\['shift', 'scale'\] is invalid for images"):
        make((1, 5, 6), tangents=["shift", "scale"])
    with pytest.raises(ConfigError, match="inputs have shape"):
        make((10,))


def test_unknown_tangent_is_named():
    cfg = OmegaConf.merge(OmegaConf.structured(REGULARIZERS["tangent_prop"].Config), {"tangents": ["rotate"]})
    with pytest.raises(ConfigError, match=r"regularizer.tangent_prop.tangents.*shift, scale"):
        REGULARIZERS["tangent_prop"].validate(cfg, "regularizer.tangent_prop")


def test_population_trains_it_beside_an_ensemble(compose_cfg):
    """Beside ``ensemble`` tangent_prop acts on the Ensemble's output as one function, as the former
    per-model loop did: the population trains it through each owner's slices (checked against plain
    torch in tests/test_population_ensemble_joint.py)."""
    base = ["trainer.epochs=1", "regularizer=[ensemble,tangent_prop]"]
    points = [{"model.width": 8, "seed": 0}]
    assert use_population(compose_cfg(base), points)
    assert use_population(compose_cfg(base + ["sweep.engine=population"]), points)


def test_tangent_prop_experiment_trains_each_variant(compose_cfg, tmp_path):
    from conftest import read_scalars
    from test_gallery import QUICK, run

    from regexp.sweep import read_csv

    run(compose_cfg, "tangent_prop", QUICK + ["model.width=16", "trainer.epochs=1", "sweep.seeds=[0]",
                                              "extra.only=[none,tangent_prop]"], tmp_path)
    table = {r["regularizer"]: r for r in read_csv(tmp_path / "results.csv")}
    assert list(table) == ["none", "tangent_prop"]
    penalty = read_scalars(tmp_path / "tangent_prop" / "seed=0")["penalty/tangent_prop"]
    assert penalty[0][1] > 0
    assert "penalty/tangent_prop" not in read_scalars(tmp_path / "none" / "seed=0")
