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

import math
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
    (float64 past that). One scratch tensor the size of ``a``, rewritten in place (each fresh
    full-size tensor is a pass and an allocation of its own), and ``real`` applied only after
    the dims it does not vary along (the rows) are summed."""
    a = a.detach()
    dims = sorted({d % a.dim() for d in ([dims] if isinstance(dims, int) else dims)})
    if real is not None:
        real = real.reshape((1,) * (a.dim() - real.dim()) + tuple(real.shape))
    free = [d for d in dims if real is None or real.shape[d] == 1]
    size = math.prod(a.shape[d] for d in dims)
    dtype = a.dtype if a.dtype == torch.float32 and size < 2 ** 24 else torch.float64

    def summed(t: torch.Tensor) -> torch.Tensor:  # (sum over no dims would sum them all)
        return t.sum(free, keepdim=True, dtype=dtype) if free else t.to(dtype, copy=True)

    scratch = torch.sign(a).abs_()  # 1 where a != 0
    nonzero = summed(scratch)
    # -1 where |a| < NEAR_ZERO, else 0 (|a| - NEAR_ZERO rounds to 0 only when they are equal)
    torch.abs(a, out=scratch).sub_(NEAR_ZERO).clamp_(max=0).sign_()
    near = summed(scratch).neg_()
    counted = torch.full_like(nonzero, float(math.prod(a.shape[d] for d in free)))
    if real is not None:
        real = real.to(dtype)
        nonzero, near, counted = nonzero * real, near * real, counted * real
    return torch.stack([counted - nonzero, near], -1).sum(dims, dtype=dtype).long()


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
