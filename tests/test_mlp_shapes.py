"""MLP shapes: uneven hidden widths (``model.widths``) and residual connections
(``model.residual``): parameter counts, the forward pass against a hand computation, and the
refusal of bad widths, and that the population engine takes both shapes (its members' equality
with their lone runs: tests/test_population_norm.py, test_population_activity.py,
test_population_multi_task.py)."""
from __future__ import annotations

import pytest
import torch

from regexp.config import validate
from regexp.errors import ConfigError
from regexp.models import build_model, count_params
from regexp.population.compat import incompatibility


def dense_params(sizes):
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("widths", [[40, 20, 20], [7], [], [3, 5, 3]])
def test_widths_give_the_layers_listed(compose_cfg, widths):
    cfg = compose_cfg([f"model.widths={widths}", "model.width=99", "model.depth=5"])
    validate(cfg)
    model = build_model(cfg.model, (1, 40), 10)
    assert count_params(model) == dense_params([40, *widths, 10])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [*widths, 10]
    assert model(torch.randn(3, 1, 40)).shape == (3, 10)


def test_residual_keeps_the_parameters_and_adds_the_skip_only_between_equal_widths(compose_cfg):
    torch.manual_seed(0)
    cfg = compose_cfg(["model.widths=[8,8,6,6]", "model.residual=true"])
    validate(cfg)
    model = build_model(cfg.model, (1, 8), 3)
    assert count_params(model) == dense_params([8, 8, 8, 6, 6, 3])
    W = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(5, 1, 8)
    h0 = x.flatten(1)
    lin = lambda i, h: h @ W[i].weight.T + W[i].bias  # noqa: E731
    h1 = h0 + torch.relu(lin(0, h0))  # 8 inputs -> 8: a skip
    h2 = h1 + torch.relu(lin(1, h1))  # 8 -> 8: a skip
    h3 = torch.relu(lin(2, h2))  # 8 -> 6: no identity to add
    h4 = h3 + torch.relu(lin(3, h3))  # 6 -> 6: a skip
    torch.testing.assert_close(model(x), lin(4, h4))


def test_residual_mnist1d_paper_mlp(compose_cfg):
    """The MNIST-1D paper's MLP: 40 -> 100 (plain), 100 -> 100 with a skip, then 10 logits."""
    model = build_model(compose_cfg(["model.residual=true"]).model, (1, 40), 10)
    assert count_params(model) == dense_params([40, 100, 100, 10])
    skips = [type(m).__name__ for m in model.hidden]
    assert skips == ["Sequential", "Residual"]


@pytest.mark.parametrize("value", ["[40,0]", "[-3]"])
def test_bad_widths_are_refused_naming_the_key(compose_cfg, value):
    with pytest.raises(ConfigError, match=r"model.widths=\[.*\] is invalid: expected null .* integers >= 1"):
        validate(compose_cfg([f"model.widths={value}"]))


@pytest.mark.parametrize("overrides", [["model.widths=[8,4]", "regularizer=[activity_l1]"],
                                       ["model.residual=true", "regularizer=[multi_task]"]])
def test_population_takes_shapes_with_activity_penalties_and_heads(compose_cfg, overrides):
    from regexp.population.run import use_population

    assert incompatibility(compose_cfg(overrides)) is None
    assert use_population(compose_cfg([*overrides, "sweep.engine=population"]), [{"seed": 0}, {"seed": 1}])
