"""Random inputs, the controls of Zhang et al. (2017), "Understanding deep learning requires
rethinking generalization" (their §2 and fig. 1a), beside random labels (``data.label_noise=1``).

``data.random_inputs`` replaces the inputs, each feature (a sample of a signal, a pixel of one
channel) counted alone:

- ``gaussian``: every training input is drawn afresh from N(μ_j, σ_j²), the mean and standard
  deviation of feature j over the (real) training set: the first two moments are kept, every
  relation between input and label is gone.
- ``random_pixels``: every training input's features are permuted by a permutation of its own,
  so its values (and their histogram) are kept but their order carries nothing.
- ``shuffled_pixels``: one permutation, drawn once, is applied to every input of the training,
  validation and test sets alike; an MLP cannot tell (its first layer just permutes its columns),
  a convolution can (neighbours are no longer neighbours).

``gaussian`` and ``random_pixels`` change the training set only: the validation and test sets
stay the real signals, so their error measures what the memorised inputs taught about real
data (nothing: chance), as ``label_noise`` leaves their labels clean. All draws come from the
data generator (``data.split_seed`` or the run's seed) after the split and label noise, so a
seed always makes the same inputs and the earlier draws are those of a run without them.
"""
from __future__ import annotations

from typing import Tuple

import torch

MODES = ("none", "gaussian", "random_pixels", "shuffled_pixels")


def randomize_inputs(mode: str, x: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor,
                     g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, x_val, x_test)`` with the inputs ``mode`` names replaced (see the module's text)."""
    if mode == "none":
        return x, x_val, x_test
    flat = x.flatten(1)
    n, d = flat.shape
    if mode == "gaussian":
        mean, std = flat.mean(0), flat.std(0)
        noise = torch.randn(n, d, generator=g, dtype=flat.dtype)
        return (mean + std * noise).reshape(x.shape), x_val, x_test
    if mode == "random_pixels":
        perms = torch.argsort(torch.rand(n, d, generator=g), dim=1)
        return flat.gather(1, perms).reshape(x.shape), x_val, x_test
    if mode == "shuffled_pixels":
        perm = torch.randperm(d, generator=g)
        same = lambda t: t.flatten(1)[:, perm].reshape(t.shape)  # noqa: E731
        return same(x), same(x_val), same(x_test)
    raise ValueError(f"unknown random_inputs mode {mode!r}; expected one of {', '.join(MODES)}")
