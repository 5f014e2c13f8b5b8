"""Bootstrap resamples as example counts: n draws with replacement from n examples.

A count vector c (Σc = n) stands for the resample; weighting example i's loss by cᵢ is the same
as training on the resample, without copying data. About 1 − (1 − 1/n)ⁿ ≈ 1 − 1/e ≈ 63.2% of
the examples appear at least once.
"""
from __future__ import annotations

import torch


def bootstrap_counts(n: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """Shape (resamples, n): how often each example is drawn in each resample."""
    draws = torch.randint(0, n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n)
    counts.scatter_add_(1, draws, torch.ones(resamples, n))
    return counts
