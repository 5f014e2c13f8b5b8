"""Validation split and label noise, both driven by an explicit generator."""
from __future__ import annotations

from typing import Tuple

import torch


def split_train_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float, g: torch.Generator):
    """Carve ``round(val_fraction * n)`` random examples out of the training set."""
    n_val = int(round(val_fraction * len(y)))
    perm = torch.randperm(len(y), generator=g)
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return x[train], y[train], x[val], y[val]


def fold_split(n: int, k: int, fold: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices for fold ``fold`` of ``k``: a seeded permutation cut in k parts."""
    parts = torch.tensor_split(torch.randperm(n, generator=g), k)
    val = parts[fold].sort().values
    train = torch.cat([p for i, p in enumerate(parts) if i != fold]).sort().values
    return train, val


def corrupt_labels(y: torch.Tensor, fraction: float, num_classes: int,
                   g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose exactly ``round(fraction * n)`` examples to corrupt; return them and their labels.

    The caller moves each chosen label by a random non-zero offset modulo the number of
    classes, so every corrupted label differs from the original and is uniform over the others.
    """
    n_noisy = int(round(fraction * len(y)))
    idx = torch.randperm(len(y), generator=g)[:n_noisy].sort().values
    return idx, y[idx].clone()
