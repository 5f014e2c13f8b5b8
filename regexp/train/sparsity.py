"""How sparse the hidden representation is: counted during the test set's evaluation pass.

Goodfellow et al., Deep Learning §7.10: a representation is sparse when most of its elements
are zero (or close to it) for a given input. Every run records, at each evaluation, over all
hidden activations (the model's hidden ``Site`` outputs, i.e. after the nonlinearity) of all
test examples:

- ``test_zero_frac``: the fraction that are exactly 0 (a ReLU unit that is off);
- ``test_near_zero_frac``: the fraction with |a| < ``NEAR_ZERO`` (1e-3), which also counts
  the almost-off units of smooth activations (tanh, gelu; sigmoid's never are: its 0 is far).

A model without hidden units (logistic regression) records neither. The counts stay on the
device until the evaluation's own read of its loss, so this adds no synchronisation.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.nn as nn

from regexp.models.sites import sites

NEAR_ZERO = 1e-3
KEYS = ("zero_frac", "near_zero_frac")


@contextmanager
def count_sparsity(model: nn.Module, enabled: bool = True) -> Iterator[Dict[str, torch.Tensor]]:
    """Within the block, count the hidden activations of every forward pass; the yielded dict
    holds the fractions (0-dim tensors) once the block ends, empty if nothing was counted."""
    out: Dict[str, torch.Tensor] = {}
    hidden = sites(model, "hidden") if enabled else []
    counts = []

    sizes = []

    def hook(module, inputs, a):
        a = a.detach()
        counts.append(torch.stack([(a == 0).sum(), (a.abs() < NEAR_ZERO).sum()]))
        sizes.append(a.numel())

    handles = [s.register_forward_hook(hook) for s in hidden]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
    if counts:
        total = torch.stack(counts).sum(0).double() / sum(sizes)
        out.update(zip(KEYS, total.unbind()))
