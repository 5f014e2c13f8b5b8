"""Datasets as in-memory tensors, split into train / validation / test.

``load_data`` returns a :class:`Dataset` whose tensors the trainer moves to the device once
and batches by permuting and slicing. The order of operations is fixed and seeded:
validation split, then the ``n_train`` subset, then label noise on what remains for
training, so a given seed always corrupts the same examples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from regexp.errors import ConfigError
from regexp.data.random_inputs import randomize_inputs
from regexp.data.splits import corrupt_labels, fold_split, split_train_val

Tensors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# name -> function(cfg) returning (x_train, y_train, x_test, y_test)
SOURCES: Dict[str, Callable[..., Tensors]] = {}


def register_source(name: str):
    def deco(fn):
        SOURCES[name] = fn
        return fn
    return deco


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    # Positions in (x_train, y_train) whose labels were replaced, and the labels they had.
    noisy_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    clean_labels: Optional[torch.Tensor] = None

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


def load_data(cfg, seed: int) -> Dataset:
    """Load ``cfg.name`` and apply the split (or k-fold), subset, label noise and random inputs,
    seeded with ``cfg.split_seed`` (or the run's seed)."""
    x, y, x_test, y_test = SOURCES[cfg.name](cfg)
    num_classes = int(max(y.max(), y_test.max()).item()) + 1
    g = torch.Generator().manual_seed(cfg.split_seed if cfg.split_seed is not None else seed)
    folds = cfg.get("folds", 0)
    if folds < 2:
        x, y, x_val, y_val = split_train_val(x, y, cfg.val_fraction, g)
    if cfg.n_train is not None:
        if cfg.n_train > len(y):
            raise ConfigError(f"data.n_train={cfg.n_train} is invalid: expected at most {len(y)}, "
                              f"the training examples left after the validation split")
        keep = torch.randperm(len(y), generator=g)[: cfg.n_train].sort().values
        x, y = x[keep], y[keep]
    if folds >= 2:  # cross-validation: the pool (n_train examples, or all) is cut into folds
        train, val = fold_split(len(y), folds, cfg.fold, g)
        x, y, x_val, y_val = x[train], y[train], x[val], y[val]
    noisy, clean = corrupt_labels(y, cfg.label_noise, num_classes, g)
    if len(noisy):
        y = y.clone()
        y[noisy] = (y[noisy] + torch.randint(1, num_classes, (len(noisy),), generator=g)) % num_classes
    x, x_val, x_test = randomize_inputs(cfg.get("random_inputs", "none"), x, x_val, x_test, g)
    return Dataset(x, y, x_val, y_val, x_test, y_test, num_classes, noisy, clean)


# Importing the modules fills the registry.
from regexp.data import mnist1d, vision  # noqa: E402,F401
