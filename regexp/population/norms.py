"""Normalizations of stacked members, each member's statistics its own (StackedMLP, StackedCNN).

Members sit side by side as channels (an MLP's (B, M·W), a CNN's (B, M·C, L)): batch norm and
instance norm are per channel, so torch's own kernels compute every member's exactly. Layer
norm (an MLP's LayerNorm, a CNN's GroupNorm(1, C)) pools over a member's units: with padding it
must count the member's real units only, which :func:`masked_normalize` does.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# batch norm's stacked buffers: running mean and variance (M, W), batches seen (M,)
Running = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def member_batch_norm(z: torch.Tensor, running: Running, g: torch.Tensor, b: torch.Tensor, training: bool,
                      momentum: Optional[float], eps: float) -> torch.Tensor:
    """Batch norm of ``z`` (N, M·W, *positions), members as channels: torch's kernel, whose
    running-statistics update (momentum, unbiased variance) lands in place in the stacked
    buffers. ``g``, ``b``: the scales and shifts, any shape of M·W entries."""
    mean, var, seen = running
    if training:
        seen += 1
    return F.batch_norm(z, mean.view(-1), var.view(-1), g.reshape(-1), b.reshape(-1), training, momentum, eps)


def masked_normalize(z: torch.Tensor, mask: torch.Tensor, dims: Sequence[int], eps: float) -> torch.Tensor:
    """(z - mean) / sqrt(var + eps) with mean and (biased) variance over ``dims`` of the entries
    where ``mask`` (broadcastable to z, 1 on real units) is 1. Padded entries come out exactly
    0 and get no gradient, whatever they held."""
    dims = tuple(dims)
    # the entries pooled per member: its real units times the positions the mask broadcasts over
    k = mask.sum(dims, keepdim=True) * math.prod(z.shape[d] // mask.shape[d] for d in dims)
    d = (z - (z * mask).sum(dims, keepdim=True) / k) * mask
    var = (d * d).sum(dims, keepdim=True) / k
    return d * torch.rsqrt(var + eps)
