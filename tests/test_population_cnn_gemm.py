"""StackedCNN's GEMM form (regexp/population/conv_gemm.py) against its grouped convolutions.

Stated tolerance: logits, recorded sites and batch norm's running statistics within
|a - b| <= 1e-5 + 1e-5·|b|, gradients within 1e-5 + 1e-4·|b| (float32; the two forms sum each
convolution in a different order). Padded channels (members of one bucket with different
channels) get exactly zero gradient in both forms.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from regexp.models.cnn import CNN
from regexp.population import tuning
from regexp.population.compat import bucket_width
from regexp.population.stacked_cnn import StackedCNN
from test_population import _assert_same_run, _pop_and_lone
from test_population_cnn_norm import POINTS

# (input shape, each member's channels, kernels, pool, norm, activation, padding, head)
CASES = {
    "1d_max_gap": ((1, 40), [(3, 5, 4), (8, 8, 8), (2, 6, 7)], [5, 3, 3], "max", "none", "relu", None, "gap"),
    "1d_batch_avg_odd": ((2, 27), [(4, 6), (6, 3)], [3, 5], "avg", "batch", "tanh", None, "flatten"),
    "1d_sigmoid_valid": ((1, 30), [(3, 2), (1, 4)], [3, 3], "none", "none", "sigmoid", 0, "flatten"),
    "2d_batch_max": ((3, 10, 10), [(4, 6), (6, 3), (2, 6)], [3, 3], "max", "batch", "relu", None, "flatten"),
}


def _pair(case):
    shape, chans, kernels, pool, norm, act, pad, head = CASES[case]
    torch.manual_seed(0)
    models = [CNN(shape, 10, list(c), kernels, pool, norm, act, 1, pad, head) for c in chans]
    nets = [StackedCNN(copy.deepcopy(models), chans, bucket_width(chans), shape, torch.device("cpu"))
            for _ in range(2)]
    nets[1].gemm = True
    assert nets[1].gemm_ok and nets[1].param_masks() is not None  # some member is padded
    return nets, len(chans), shape


@pytest.mark.parametrize("case", list(CASES))
def test_gemm_form_equals_grouped_convolutions(case):
    (grouped, gemm), m, shape = _pair(case)
    b, d = 12, int(torch.tensor(shape).prod())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, b, d, generator=gen)
    y = torch.randint(0, 10, (m, b), generator=gen)
    sizes, _ = grouped.site_sizes
    # dropout masks of the input and each stage's site (scaled as inverted dropout's)
    masks = [(torch.rand(m, b, n, generator=gen) > 0.2).float() / 0.8 for n in [d, *map(max, zip(*sizes))]]
    for step in range(2):
        # the first step with dropout masks and recorded sites, the second without them (relu and
        # max pooling then run as one pass) and on batch norm's updated running statistics
        out = []
        for net in (grouped, gemm):
            net.record = step == 0
            for p in net.params:
                p.grad = None
            logits = net.forward(x, masks if step == 0 else None)
            F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1)).backward()
            out.append((logits.detach(), [h.detach() for h in net.hidden], [p.grad for p in net.params]))
        (la, ha, ga), (lb, hb, gb) = out
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
        for a, h in zip(ha, hb):
            torch.testing.assert_close(h, a, atol=1e-5, rtol=1e-5)
        for name, a, g, real in zip(grouped.names, ga, gb, gemm.param_masks()):
            torch.testing.assert_close(g, a, atol=1e-5, rtol=1e-4, msg=name)
            assert torch.equal(g[~real], torch.zeros_like(g[~real])), name
        for a, t in zip(grouped.buffers, gemm.buffers):  # batch norm's per-member running statistics
            torch.testing.assert_close(t, a, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            for net in (grouped, gemm):
                for p in net.params:
                    p -= 0.1 * p.grad
    # evaluation (running statistics, no dropout) and its counts of zero activations
    counts = [torch.zeros(m, 2, dtype=torch.long) for _ in range(2)]
    ea, eb = (net.eval_logits(x, 5, c) for net, c in zip((grouped, gemm), counts))
    torch.testing.assert_close(eb, ea, atol=1e-5, rtol=1e-5)
    if CASES[case][5] == "relu":  # exact zeros: the same units, bar a sign flip of rounding size
        assert (counts[1][:, 0] - counts[0][:, 0]).abs().max() <= 2


def test_gemm_form_input_gradient_equals_grouped():
    # FGSM and input-gradient transforms differentiate the logits with respect to the input
    (grouped, gemm), m, shape = _pair("2d_batch_max")
    x = torch.randn(m, 6, int(torch.tensor(shape).prod()))
    grads = []
    for net in (grouped, gemm):
        xi = x.clone().requires_grad_()
        net.forward(xi).square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_cnn_bucket_measures_its_form_and_trains_as_lone_runs_on_it(compose_cfg, tmp_path, monkeypatch):
    # the GEMM form timed faster: chosen, cached under the bucket's CNN key, and the members
    # still train as their lone runs do (padded channels, batch norm's running statistics)
    monkeypatch.setattr(tuning, "time_forms", lambda step: (step(False), step(True), (2e-3, 1e-3))[2])
    overrides = ["data.n_train=600", "model=cnn_mnist1d", "model.norm=batch", "optimizer=momentum",
                 "regularizer=[weight_decay]", "model.stride=1"]
    base, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, POINTS)
    for p, a, b in zip(POINTS, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
        assert a["population_tuning"]["loop"] is True
        assert a["population_tuning"]["forms"] == list(tuning.CNN_FORMS)
        assert a["population_tuning"]["source"] == "measured"
    assert any(k.startswith("cnn ") for m in tuning._read(tuning.cache_path()).values() for k in m)


@pytest.mark.parametrize("stride,why", [(1, "a penalty's double backward"), (2, None)])
def test_cnn_bucket_keeps_grouped_convolutions_unmeasured_where_it_must(monkeypatch, stride, why):
    # a double backward (tangent_prop, gradient_norm_penalty) or a strided stage: no GEMM form
    def never(step):
        raise AssertionError("measured a bucket that cannot run the GEMM form")

    monkeypatch.setattr(tuning, "time_forms", never)
    models = [CNN((1, 40), 10, [4, 8], 3, "max", "none", "relu", stride, None, "gap") for _ in range(2)]
    net = StackedCNN(models, [(4, 8)] * 2, (4, 8), (1, 40), torch.device("cpu"))
    net.gemm = True
    choice = tuning.choose_form(SimpleNamespace(net=net, device=torch.device("cpu"), members=[0, 1]), 32, why)
    assert choice.loop is False and net.gemm is False and "grouped only" in choice.source
