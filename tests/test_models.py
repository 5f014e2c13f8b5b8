"""Every model runs forward and backward on signals and images; inits have their variances."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from regexp.config import CNNConfig, MLPConfig, TransformerConfig
from regexp.models import NORMS, build_model, count_params, sites
from regexp.models.init import init_weights

SHAPES = [(1, 40), (1, 28, 28), (3, 32, 32)]


def cfg(schema, **kw):
    return OmegaConf.merge(OmegaConf.structured(schema), kw)


CASES = ([cfg(MLPConfig, norm=n, activation=a) for n in NORMS["mlp"] for a in ("relu", "tanh", "sigmoid", "gelu")]
         + [cfg(CNNConfig, norm=n, pool=p, channels=[4, 8]) for n in NORMS["cnn"] for p in ("max", "avg", "none")]
         + [cfg(TransformerConfig, embed_dim=16, heads=2, depth=1)])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mcfg", CASES, ids=lambda c: f"{c.name}-{c.get('norm')}-{c.get('activation', c.get('pool'))}")
def test_forward_backward(mcfg, shape):
    torch.manual_seed(0)
    model = build_model(mcfg, shape, 10)
    x = torch.randn(6, *shape)
    out = model(x)
    assert out.shape == (6, 10)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert len(sites(model, "input")) == 1 and len(sites(model, "hidden")) >= 1


def test_mlp_shape_follows_width_and_depth():
    model = build_model(cfg(MLPConfig, width=7, depth=3), (1, 40), 10)
    assert count_params(model) == (40 * 7 + 7) + 2 * (7 * 7 + 7) + (7 * 10 + 10)


UNIFORM_KURTOSIS, NORMAL_KURTOSIS = 1.8, 3.0  # E[w⁴]/E[w²]² of U(−b, b) and of N(0, σ²)
# /work/shared/reference.md "Initialization": (variance, bound of a uniform or None for a normal)
# as functions of fan-in and fan-out; uniform: U(−a, a) has variance a²/3.
INIT_FORMULAS = {
    "xavier": (lambda fi, fo: 2 / (fi + fo), lambda fi, fo: math.sqrt(6 / (fi + fo))),
    "xavier_normal": (lambda fi, fo: 2 / (fi + fo), None),
    "he": (lambda fi, fo: 2 / fi, None),
    "he_uniform": (lambda fi, fo: 2 / fi, lambda fi, fo: math.sqrt(6 / fi)),
    "normal": (lambda fi, fo: 0.05 ** 2, None),
    "uniform": (lambda fi, fo: 0.3 ** 2 / 3, lambda fi, fo: 0.3),
}
# (layer, fan_in, fan_out): a convolution's fans count the kernel's taps
LAYERS = [
    (lambda: torch.nn.Linear(400, 300), 400, 300),
    (lambda: torch.nn.Conv1d(64, 96, 7), 64 * 7, 96 * 7),
    (lambda: torch.nn.Conv2d(32, 64, 5), 32 * 25, 64 * 25),
]


@pytest.mark.parametrize("layer, fan_in, fan_out", LAYERS, ids=["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("scheme", INIT_FORMULAS)
def test_init_matches_its_formula(scheme, layer, fan_in, fan_out):
    torch.manual_seed(0)
    layer = layer()
    init_weights(layer, scheme, std=0.05, a=0.3)
    w = layer.weight.double()
    variance, bound = INIT_FORMULAS[scheme]
    assert w.var().item() == pytest.approx(variance(fan_in, fan_out), rel=0.03)
    assert w.mean().item() == pytest.approx(0.0, abs=0.02 * math.sqrt(variance(fan_in, fan_out)))
    kurtosis = (w ** 4).mean().item() / (w ** 2).mean().item() ** 2
    if bound is None:
        assert kurtosis == pytest.approx(NORMAL_KURTOSIS, rel=0.05)
    else:
        assert kurtosis == pytest.approx(UNIFORM_KURTOSIS, rel=0.05)
        b = bound(fan_in, fan_out)
        assert w.abs().max().item() <= b and w.abs().max().item() >= 0.99 * b
    assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_uniform_without_a_is_glorots_heuristic():
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 300)
    init_weights(layer, "uniform")  # a = 1/√n_in (Glorot & Bengio 2010, eq. 1)
    assert layer.weight.abs().max().item() == pytest.approx(1 / math.sqrt(400), rel=0.01)
    assert layer.weight.abs().max().item() <= 1 / math.sqrt(400)
    mcfg = cfg(MLPConfig, width=300, depth=1, init="uniform", init_a=0.2)
    assert build_model(mcfg, (1, 40), 10).hidden[0].weight.abs().max().item() == pytest.approx(0.2, rel=0.01)


def test_unknown_init_names_the_valid_ones():
    from regexp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.init='glorot' is invalid: expected one of default, xavier, "
                                          r"xavier_normal, he, he_uniform, normal, uniform, zeros"):
        init_weights(torch.nn.Linear(3, 2), "glorot")


def test_zero_init_never_breaks_symmetry():
    torch.manual_seed(0)
    model = build_model(cfg(MLPConfig, width=5, depth=1, init="zeros"), (1, 40), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(32, 1, 40)), torch.randint(0, 10, (32,))).backward()
        opt.step()
    w = model.hidden[0].weight
    assert torch.equal(w, w[:1].expand_as(w))  # every hidden unit is still the same


# ---------------------------------------------------------------- the MNIST-1D paper's models
@pytest.fixture
def model_cfg(compose_cfg):
    """``model=<name>`` composed as the CLI would (and validated), with ``kw`` set on it."""
    from regexp.config import validate

    def _compose(name, **kw):
        composed = compose_cfg([f"model={name}"] + [f"model.{k}={v}" for k, v in kw.items()])
        validate(composed)
        return composed.model
    return _compose


def conv_out(n, k, s, p):  # the textbook output length (Goodfellow et al., 2016, sec. 9.5)
    return math.floor((n + 2 * p - k) / s) + 1


def test_paper_cnn_has_convbase_parameters_and_layer_shapes(model_cfg):
    model = build_model(model_cfg("cnn_mnist1d"), (1, 40), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [tuple(c.weight.shape) for c in convs] == [(25, 1, 5), (25, 25, 3), (25, 25, 3)]
    assert [(c.stride, c.padding) for c in convs] == [((2,), (1,))] * 3
    assert tuple(model.head.weight.shape) == (10, 125)
    # 150 + 1900 + 1900 + 1260
    assert count_params(model) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10) == 5210
    h, lengths = torch.randn(3, 1, 40), []
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv1d):
            lengths.append(h.shape[-1])
    assert lengths == [19, 10, 5] and model(torch.randn(3, 1, 40)).shape == (3, 10)
    # flatten head: the logits are the Linear of the flattened 25 x 5 map, nothing pooled
    x = torch.randn(4, 1, 40)
    torch.testing.assert_close(model(x), model.head(model.features(x).flatten(1)))


@pytest.mark.parametrize("kernel, stride, padding, n", [
    ([5, 3, 4], [2, 1, 3], [1, 0, 2], 40), (3, 2, 0, 40), ([7, 1, 2], 1, None, 33), (4, 3, [0, 1, 2], (28, 20))])
def test_cnn_per_stage_output_lengths_follow_the_formula(kernel, stride, padding, n):
    sizes = (n,) if isinstance(n, int) else n
    mcfg = cfg(CNNConfig, channels=[2, 3, 4], kernel_size=kernel, stride=stride, padding=padding,
               pool="none", head="flatten")
    model = build_model(mcfg, (1, *sizes), 10)
    per = lambda v: v if isinstance(v, list) else [v] * 3  # noqa: E731
    ks, ss = per(kernel), per(stride)
    ps = [k // 2 for k in ks] if padding is None else per(padding)
    expected, stage = sizes, 0
    h = torch.randn(2, 1, *sizes)
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
            expected = tuple(conv_out(d, ks[stage], ss[stage], ps[stage]) for d in expected)
            assert tuple(h.shape[2:]) == expected
            stage += 1
    assert stage == 3
    assert model.head.in_features == 4 * math.prod(expected)


def test_cnn_default_is_unchanged():
    # the default (kernel 5, padding 2, stride 1, max pool, global average pooling) as it was built
    torch.manual_seed(0)
    model = build_model(cfg(CNNConfig), (1, 40), 10)
    torch.manual_seed(0)
    old = [torch.nn.Conv1d(1, 16, 5, padding=2), torch.nn.Conv1d(16, 32, 5, padding=2), torch.nn.Linear(32, 10)]
    x = torch.randn(5, 1, 40)
    h = torch.max_pool1d(torch.relu(old[0](x)), 2)
    h = torch.max_pool1d(torch.relu(old[1](h)), 2)
    torch.testing.assert_close(model(x), old[2](h.mean(-1)), rtol=0, atol=0)


def test_cnn_stage_shrinking_below_one_is_refused_naming_the_stage():
    from regexp.errors import ConfigError

    mcfg = cfg(CNNConfig, channels=[4, 4, 4], kernel_size=3, stride=[2, 4, 4], padding=0, pool="none")
    assert build_model(mcfg, (1, 40), 10).out_sizes == (1,)  # 40 -> 19 -> 5 -> 1 fits
    mcfg = cfg(CNNConfig, channels=[4, 4, 4, 4], kernel_size=3, stride=[2, 4, 4, 4], padding=0, pool="none")
    with pytest.raises(ConfigError, match=r"stage 3 \(kernel 3, stride 4, padding 0\) would shrink its input "
                                          r"of size 1 to 0"):
        build_model(mcfg, (1, 40), 10)  # a fourth stage would not


@pytest.mark.parametrize("key, value", [("kernel_size", [5, 3]), ("stride", [2, 2, 2, 2]), ("padding", [1, -1]),
                                        ("stride", 0), ("kernel_size", "big")])
def test_cnn_bad_per_stage_list_is_refused_naming_the_key(key, value):
    from regexp.config import stage_values
    from regexp.errors import ConfigError

    mcfg = cfg(CNNConfig, channels=[4, 4] if key == "padding" else [4, 4, 4], **{key: value})
    with pytest.raises(ConfigError, match=rf"^model\.{key}=.* is invalid: expected an integer >= \d or a list of "
                                          rf"{len(mcfg.channels)} of them"):
        stage_values(mcfg, key, 0 if key == "padding" else 1)


def test_paper_gru_has_5134_parameters(model_cfg):
    model = build_model(model_cfg("gru"), (1, 40), 10)
    per_direction = 3 * (6 * 1 + 6 * 6 + 2 * 6)  # input, recurrent weights, two biases per gate
    assert count_params(model) == 2 * per_direction + (2 * 6 * 40 * 10 + 10) == 5134
    assert tuple(model.head.weight.shape) == (10, 480)
    # the flatten head reads every one of the 40 steps: the logits equal Linear(GRU outputs)
    x = torch.randn(3, 1, 40)
    out, _ = model.rnn(x.transpose(1, 2))
    assert out.shape == (3, 40, 12)
    torch.testing.assert_close(model(x), model.head(out.flatten(1)))


def test_gru_last_head_and_image_rows(model_cfg):
    model = build_model(model_cfg("gru", head="last", hidden_size=5), (1, 40), 10)
    assert tuple(model.head.weight.shape) == (10, 10)
    x = torch.randn(2, 1, 40)
    out, _ = model.rnn(x.transpose(1, 2))
    # forward's state after the last step, backward's after the first
    torch.testing.assert_close(model(x), model.head(torch.cat([out[:, -1, :5], out[:, 0, 5:]], 1)))
    img = build_model(model_cfg("gru", hidden_size=4), (3, 8, 6), 10)  # 8 rows of 3 x 6 values
    assert img.rnn.input_size == 18 and img.head.in_features == 2 * 4 * 8
    assert img(torch.randn(2, 3, 8, 6)).shape == (2, 10)


def test_mlp_depth_zero_is_logistic_regression():
    model = build_model(cfg(MLPConfig, depth=0), (1, 40), 10)
    assert count_params(model) == 40 * 10 + 10 == 410
    assert [type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)] == [torch.nn.Linear]
    assert not sites(model, "hidden")
    x = torch.randn(7, 1, 40)
    torch.testing.assert_close(model(x), x.flatten(1) @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize("reg", ["dropout", "activity_l1", "activity_student_t"])
def test_hidden_unit_regularizers_refuse_a_model_without_hidden_units(reg):
    from regexp.errors import ConfigError
    from regexp.regularizers import REGULARIZERS

    model = build_model(cfg(MLPConfig, depth=0), (1, 40), 10)
    r = REGULARIZERS[reg](OmegaConf.structured(REGULARIZERS[reg].Config), None)
    with pytest.raises(ConfigError, match=rf"regularizer\.{reg} acts on hidden units.*model.depth >= 1"):
        r.attach(model)
    # input dropout alone still applies to logistic regression
    REGULARIZERS["dropout"](OmegaConf.create({"p": 0.0, "input_p": 0.2, "mc_samples": 0}), None).attach(model)
    assert sites(model, "input")[0].p == 0.2


@pytest.mark.parametrize("reg, model, message", [
    ("dropconnect", "logistic", r"regularizer\.dropconnect\.include_head=false leaves this model no layer"),
    ("weight_noise", "gru", r"regularizer\.weight_noise perturbs Linear/Conv weights, not a GRU's recurrent ones"),
    ("dropconnect", "gru", r"regularizer\.dropconnect perturbs Linear/Conv weights"),
])
def test_weight_perturbations_refuse_models_they_would_miss(reg, model, message):
    from regexp.config import GRUConfig
    from regexp.errors import ConfigError
    from regexp.regularizers import REGULARIZERS

    net = build_model(cfg(MLPConfig, depth=0) if model == "logistic" else cfg(GRUConfig), (1, 40), 10)
    r = REGULARIZERS[reg](OmegaConf.structured(REGULARIZERS[reg].Config), None)
    with pytest.raises(ConfigError, match=message):
        r.attach(net)
