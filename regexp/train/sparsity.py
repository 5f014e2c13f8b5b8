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
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn

from regexp.models.sites import sites

NEAR_ZERO = 1e-3
KEYS = ("zero_frac", "near_zero_frac")


def zero_counts(a: torch.Tensor, dims, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., 2) int64 counts over ``dims`` of ``a``'s entries that are exactly 0 and that are
    below NEAR_ZERO in magnitude, among the entries ``real`` (a 0/1 mask broadcastable to ``a``)
    marks. Sums of float signs, not of bool tensors: on CPU reducing a bool tensor costs
    about ten passes over ``a``; the float sums are exact while each total stays below 2**24
    (float64 past that)."""
    ab = a.detach().abs()
    dims = [d % ab.dim() for d in ([dims] if isinstance(dims, int) else dims)]
    size = 1
    for d in dims:
        size *= ab.shape[d]
    dtype = ab.dtype if ab.dtype == torch.float32 and size < 2 ** 24 else torch.float64
    nonzero = torch.sign(ab)
    near = torch.sign((NEAR_ZERO - ab).clamp_(min=0))  # 1 where |a| < NEAR_ZERO, else exactly 0
    if real is None:
        kept = [n for d, n in enumerate(ab.shape) if d not in dims]
        total = torch.full(kept, float(size), dtype=dtype, device=a.device)
    else:
        real = real.to(ab.dtype)
        nonzero, near = nonzero * real, near * real
        total = real.expand_as(ab).sum(dims, dtype=dtype)
    nz, nr = nonzero.sum(dims, dtype=dtype), near.sum(dims, dtype=dtype)
    return torch.stack([total - nz, nr], -1).long()


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
        counts.append(zero_counts(a, tuple(range(a.dim()))))
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
