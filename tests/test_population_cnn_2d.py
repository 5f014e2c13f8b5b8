"""2-D CNN populations (Conv2d stages on images) against their lone runs.

The images are small files in the real MNIST / CIFAR-10 formats (tests/test_data.py writes
them; nothing is downloaded), read through the real loaders. Stated tolerance as in
tests/test_population.py: after 2 epochs every parameter and batch-norm statistic of a member
agrees with its lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b| (float32), every logged
metric (hidden-activation sparsity included) within a relative 1e-4.
"""
from __future__ import annotations

import pytest

from regexp.population.compat import bucket_widths, cnn_cost, incompatibility
from test_data import write_cifar, write_mnist
from test_population import _assert_same_run, _pop_and_lone

POINTS = [{"model.channels": [3, 4], "optimizer.lr": 0.02, "regularizer.weight_decay.lam": 0.001, "seed": 0},
          {"model.channels": [4, 4], "optimizer.lr": 0.05, "regularizer.weight_decay.lam": 0.0, "seed": 1},
          {"model.channels": [2, 3], "optimizer.lr": 0.01, "regularizer.weight_decay.lam": 0.01, "seed": 2}]
# (data, model settings): max-pooling and a flatten head without norm; batch norm with a
# flatten head; layer norm (GroupNorm(1, C)) on 3-channel CIFAR images. The normalized ones
# average-pool: after batch norm and relu, max pooling chooses between near-equal values, and
# a float32 rounding difference of 1e-8 that switched one window's maximum moved the weights
# by 3e-4 within 12 steps (measured; the same runs average-pooled agree within 6e-7).
CASES = {
    "mnist": ("mnist", ["model.pool=max", "model.norm=none", "model.head=flatten", "optimizer=adam"]),
    "fashion_batch": ("fashion_mnist", ["model.pool=avg", "model.norm=batch", "model.head=flatten",
                                        "optimizer=momentum"]),
    "cifar_layer": ("cifar10", ["model.pool=avg", "model.norm=layer", "optimizer=adam"]),
}


def _write(root, name: str) -> None:
    if name == "cifar10":
        write_cifar(root, per_batch=40)  # 200 training images
    else:
        write_mnist(root, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name], n_train=200, n_test=40)


@pytest.mark.parametrize("case", list(CASES))
def test_image_cnn_members_of_different_channels_match_lone_runs(compose_cfg, tmp_path, case):
    data, settings = CASES[case]
    _write(tmp_path / "data", data)
    overrides = [f"data={data}", f"data.root={tmp_path / 'data'}", "data.download=false", "data.n_train=null",
                 "model=cnn", "model.kernel_size=3", "trainer.batch_size=32",
                 "regularizer=[weight_decay]"] + settings
    cfg = compose_cfg(overrides)
    assert incompatibility(cfg) is None
    shape = (3, 32, 32) if data == "cifar10" else (1, 28, 28)
    shapes = [tuple(p["model.channels"]) for p in POINTS]
    assert len(bucket_widths(shapes, 1.5, 32, cnn_cost(cfg.model, shape, 10))) == 1
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, POINTS)
    for p, a, b in zip(POINTS, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    assert len({m["final"]["train_loss"] for m in pop}) == 3


def test_image_cost_counts_both_kernel_dimensions(compose_cfg):
    # one 3x3 stage of c channels on a 1x28x28 image, no padding loss (padding 1), gap head:
    # 28·28 positions x c x 1 input channel x 9 taps, then c x 10 for the head
    cfg = compose_cfg(["model=cnn", "model.channels=[4]", "model.kernel_size=3", "model.pool=none"])
    cost = cnn_cost(cfg.model, (1, 28, 28), 10)
    assert cost((4,)) == 28 * 28 * 4 * 1 * 9 + 4 * 10


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_image_cnn_draws_and_activity_penalties_with_norms_match_lone_runs(compose_cfg, tmp_path, norm):
    # the draws on images: each member's dropout mask over (C, H, W) at the input and each
    # stage, DropConnect and weight noise on its (C_out, C_in·k·k) block, the activity penalty
    # on each stage's normalized site, all in its lone run's order, with per-member values.
    # Batch norm trains with plain SGD: the convolution's bias before it has a gradient of pure
    # rounding noise (the norm takes away each channel's mean), whose momentum buffer the
    # checkpoint comparison would read (it differed by 3e-5 there; the weights agreed).
    # Under layer norm the second stage's conv bias is nearly such a parameter too (its gradient
    # sums to zero over the channels): after the noisy draws it agrees to 1.9e-5 on one thread
    # of the AVX2 EPYC (under 1e-5 on the AVX-512 Xeon), so this test states 5e-5
    _write(tmp_path / "data", "mnist")
    overrides = ["data=mnist", f"data.root={tmp_path / 'data'}", "data.download=false", "data.n_train=null",
                 "model=cnn", "model.kernel_size=3", "trainer.batch_size=32", "model.pool=avg", f"model.norm={norm}",
                 "optimizer=sgd" if norm == "batch" else "optimizer=momentum", "regularizer=[weight_decay,dropconnect,weight_noise,dropout,activity_l1]"]
    points = [{**p, "regularizer.dropout.p": d, "regularizer.dropconnect.p": c, "regularizer.weight_noise.sigma": s,
               "regularizer.activity_l1.alpha": a}
              for p, d, c, s, a in zip(POINTS, [0.1, 0.0, 0.2], [0.2, 0.0, 0.1], [0.02, 0.05, 0.0], [0.01, 0.0, 0.02])]
    assert incompatibility(compose_cfg(overrides)) is None
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b, atol=5e-5)
