"""CNN mechanics (course report §4): the output-size rule ⌊(n + 2p − k)/s⌋ + 1 against the
shapes the layers produce, convolution by im2col + one matrix product against torch's
conv1d / conv2d, the logged model summary, and ``+experiment=cnn_mechanics`` end to end."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from regexp.config import validate
from regexp.models import build_model
from regexp.models.im2col import conv_im2col, im2col
from regexp.models.summary import stage_rows
from regexp.sweep import read_csv
from regexp.tasks import TASKS

QUICK = ["trainer.threads=1", "trainer.progress=false", "logger.grad_norms=false", "logger.histogram_every=0"]


@pytest.mark.parametrize("c_in, c_out, k, s, p, d", [
    (1, 1, 3, 1, 0, 1), (3, 4, 5, 2, 1, 1), (2, 5, 3, 3, 2, 2), (4, 2, 1, 1, 0, 1), (2, 3, 4, 2, 3, 3)])
def test_im2col_equals_conv1d_in_values_and_gradients(c_in, c_out, k, s, p, d):
    torch.manual_seed(0)
    x = torch.randn(3, c_in, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    ours = conv_im2col(x, w, b, s, p, d)
    ref = F.conv1d(x, w, b, s, p, d)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g))


@pytest.mark.parametrize("k, s, p, d", [((3, 3), 1, 1, 1), ((3, 2), (2, 1), (1, 0), 1), ((2, 3), 2, (0, 2), (2, 1))])
def test_im2col_equals_conv2d(k, s, p, d):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    w = torch.randn(4, 3, *k, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(conv_im2col(x, w, b, s, p, d), F.conv2d(x, w, b, s, p, d))


def test_im2col_columns_are_the_receptive_fields():
    """Hand case: x = 1..5, k = 3, s = 2, p = 1: the padded signal 0 1 2 3 4 5 0 has fields
    [0 1 2], [2 3 4], [4 5 0]; one column each, ⌊(5 + 2 − 3)/2⌋ + 1 = 3 columns."""
    x = torch.arange(1.0, 6.0).reshape(1, 1, 5)
    cols = im2col(x, 3, stride=2, padding=1)
    assert torch.equal(cols[0], torch.tensor([[0.0, 2, 4], [1, 3, 5], [2, 4, 0]]))


def rule(n, k, s, p):
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("overrides, shape, sizes", [
    # the MNIST-1D paper's ConvBase: 40 -> 19 -> 10 -> 5
    (["model=cnn_mnist1d"], (1, 40), [rule(40, 5, 2, 1), rule(19, 3, 2, 1), rule(10, 3, 2, 1)]),
    (["model=cnn", "model.channels=[4,4]", "model.kernel_size=[7,4]", "model.stride=[3,1]", "model.padding=[0,2]",
      "model.pool=none"], (1, 40), [rule(40, 7, 3, 0), rule(12, 4, 1, 2)]),
    # with max pooling (k = s = 2, p = 0) after each conv
    (["model=cnn", "model.channels=[2,3]", "model.kernel_size=3", "model.stride=2", "model.padding=0"], (1, 40),
     [rule(40, 3, 2, 0), rule(19, 2, 2, 0), rule(9, 3, 2, 0), rule(4, 2, 2, 0)]),
    (["model=cnn", "model.channels=[2,2]", "model.kernel_size=[5,3]", "model.stride=[2,1]", "model.padding=[1,0]",
      "model.pool=none"], (3, 11, 8), [(rule(11, 5, 2, 1), rule(8, 5, 2, 1)), (rule(5, 3, 1, 0), rule(3, 3, 1, 0))]),
])
def test_rule_matches_the_real_shapes(compose_cfg, overrides, shape, sizes):
    model = build_model(compose_cfg(overrides).model, shape, 10)
    stages = [r for r in stage_rows(model, shape) if "rule" in r]
    expected = [s if isinstance(s, tuple) else (s,) for s in sizes]
    assert [r["rule"] for r in stages] == expected
    assert [r["out"][1:] for r in stages] == expected


def test_experiment_writes_shapes_im2col_and_the_sharing_comparison(compose_cfg, tmp_path, caplog):
    """Also: each training run logs the model summary with every stage's rule worked out."""
    import regexp.experiments  # noqa: F401  (registers the task)
    from regexp.experiments.cnn_mechanics import mlp_params

    overrides = ["data.n_train=100", "trainer.epochs=1", "extra.seeds=[0]", "extra.mlp_depth=1", *QUICK]
    cfg = compose_cfg(["+experiment=cnn_mechanics", *overrides])
    validate(cfg)
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="regexp"):
        metrics = TASKS[cfg.task](cfg, tmp_path, overrides, False)
    assert metrics["status"] == "completed" and metrics["runs"] == 2
    shapes = read_csv(tmp_path / "shapes.csv")
    assert [(r["rule_size"], r["actual_size"]) for r in shapes] == [("19", "19"), ("10", "10"), ("5", "5")]
    # conv stage 0: 25 kernels of 5 and 25 biases; unshared: one kernel per each of the 19 positions
    assert (shapes[0]["params_shared"], shapes[0]["params_unshared"], shapes[0]["params_dense"]) == \
        ("150", str(25 * 19 * (5 + 1)), str((40 + 1) * 25 * 19))
    assert all(float(r["max_abs_diff"]) < 1e-5 for r in read_csv(tmp_path / "im2col.csv"))
    runs = {r["model"]: r for r in read_csv(tmp_path / "results.csv")}
    assert runs["cnn"]["params"] == "5210"
    # depth 1: 51·w + 10 parameters; w = 102 gives 5,212, the nearest to 5,210
    assert mlp_params(40, 102, 1, 10) == 5212 and runs["mlp"]["params"] == "5212"
    for name in ("im2col", "sharing"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"figures/im2col", "figures/sharing"} <= set(acc.Tags()["images"])
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model cnn")]
    lines = summary.splitlines()
    assert lines[0] == ("model cnn: 5,210 parameters, input (1, 40); output size of each conv/pool stage: "
                        "⌊(n + 2p − k)/s⌋ + 1")
    assert lines[1].split() == ["features.0", "Conv1d", "(1,", "40)", "->", "(25,", "19)", "150", "params",
                                "⌊(40", "+", "2·1", "−", "5)/2⌋", "+", "1", "=", "19"]
    assert lines[3].endswith("⌊(10 + 2·1 − 3)/2⌋ + 1 = 5")
    assert lines[4].split()[:2] == ["head", "Linear"]
