"""Augmentation in CNN populations: each member draws its lone run's shifts and scales (1-D
signals) or crops and flips (images) from its own generator, in its lone run's order.

Stated tolerance as in tests/test_population.py: after 2 epochs every parameter and batch-norm
statistic of a member agrees with its lone ``train()`` run within |a - b| <= 1e-5 + 1e-4·|b|
(float32), every logged metric within a relative 1e-4.
"""
from __future__ import annotations

import torch

from regexp.population.compat import incompatibility
from regexp.sweep import point_name
from test_data import write_cifar
from test_population import _assert_same_run, _pop_and_lone

# members differ in channels, seed and their augmentation's shift and scale (0: none)
SIGNAL_POINTS = [{"model.channels": [4, 6, 5], "regularizer.augmentation.shift": 3,
                  "regularizer.augmentation.scale": 0.1, "seed": 0},
                 {"model.channels": [8, 8, 8], "regularizer.augmentation.shift": 1,
                  "regularizer.augmentation.scale": 0.0, "seed": 1},
                 {"model.channels": [8, 8, 8], "regularizer.augmentation.shift": 0,
                  "regularizer.augmentation.scale": 0.2, "seed": 1}]


def test_augmented_signal_cnn_members_match_lone_runs(compose_cfg, tmp_path):
    # input noise after the augmentation: the lone run's order of draws
    overrides = ["data.n_train=600", "model=cnn_mnist1d", "optimizer=momentum",
                 "regularizer=[augmentation,input_noise]", "regularizer.input_noise.sigma=0.1"]
    assert incompatibility(compose_cfg(overrides)) is None
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, SIGNAL_POINTS)
    for p, a, b in zip(SIGNAL_POINTS, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    w1, w2 = (torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)["features.0.weight"]
              for p in SIGNAL_POINTS[1:])
    assert (w1 - w2).abs().max() > 1e-4  # same seed and channels: the augmentations alone differ


def test_augmented_image_cnn_members_with_batch_norm_match_lone_runs(compose_cfg, tmp_path):
    # the double_descent_cnn_cifar10 recipe in small: batch norm, pad-and-crop with flips, each
    # member its own crop padding, on files in the real CIFAR-10 format (average pooling, not the
    # recipe's max: see tests/test_population_cnn_2d.py). Plain SGD: with momentum, a conv
    # weight's momentum buffer agreed with the lone run's within 4e-5 (7e-3 relative; measured),
    # past the checkpoint check's 1e-5 + 1e-3·|b|, while the weights agreed within 3e-6.
    write_cifar(tmp_path / "data", per_batch=40)
    points = [{"model.channels": [2, 4], "regularizer.augmentation.shift": 4, "seed": 0},
              {"model.channels": [4, 4], "regularizer.augmentation.shift": 2, "seed": 1},
              {"model.channels": [4, 4], "regularizer.augmentation.shift": 0, "seed": 1}]
    overrides = ["data=cifar10", f"data.root={tmp_path / 'data'}", "data.download=false", "data.n_train=null",
                 "model=cnn", "model.kernel_size=3", "model.norm=batch", "model.pool=avg", "optimizer=sgd",
                 "trainer.batch_size=32", "regularizer=[augmentation]", "regularizer.augmentation.flip=true"]
    assert incompatibility(compose_cfg(overrides)) is None
    _, pop, lone = _pop_and_lone(compose_cfg, tmp_path, overrides, points)
    for p, a, b in zip(points, pop, lone):
        _assert_same_run(tmp_path, p, a, b)
    w1, w2 = (torch.load(tmp_path / "pop" / point_name(p) / "model.pt", weights_only=True)["features.0.weight"] for p in points[1:])
    assert (w1 - w2).abs().max() > 1e-4
