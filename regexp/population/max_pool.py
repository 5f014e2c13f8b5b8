"""2-wide max pooling of signals with torch's values and gradient, at the cost of its no-grad kernel.

On CPU, max pooling that autograd will differentiate runs ``max_pool2d_with_indices``, which
writes an int64 index per output: 2.8 ms forward for (100, 96, 40) float32 against 0.44 ms for
the kernel torch uses when no gradient is needed (a loaded 2-core Xeon; forward and backward
3.8 against 2.7 ms here, 5.8 against 4.1 ms in a busier run, at a width-32 StackedCNN step of
~15 ms with two such poolings). Here the forward runs that fast kernel and keeps a 0/1 mask of
each window's first maximum (the position torch's indices point at: a tie goes to the earlier
one); the backward is the gradient times that mask, one pass.

The backward is written in differentiable ops, linear in the incoming gradient, so a double
backward through it (the probes' Hessian products, tangent propagation) gives torch's result.
:func:`relu_max_pool1d` is relu then max pooling in that one pass (relu's own backward, a
full-size pass, then falls away). Images keep torch's ``max_pool2d``: a mask of the 2 × 2
windows' first maximum measured slower than torch's indices. NaN inputs are not handled as
torch handles them (no position is marked).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _MaxPool1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        out = F.max_pool1d(h, 2)
        n = out.shape[-1]
        win = h[..., :2 * n].reshape(*out.shape, 2)
        first = win[..., 0] >= win[..., 1]  # where the earlier position holds the maximum
        mask = torch.empty_like(win)
        mask[..., 0] = first
        mask[..., 1] = ~first
        ctx.save_for_backward(mask)
        ctx.length = h.shape[-1]
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (mask,) = ctx.saved_tensors
        gh = (mask * g.unsqueeze(-1)).flatten(-2)
        # an odd length's last position: no gradient (F.pad copies even when it adds nothing)
        return F.pad(gh, (0, 1)) if ctx.length % 2 else gh


class _ReluMaxPool1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        out = F.max_pool1d(h, 2).clamp_min_(0)
        n = out.shape[-1]
        win = h[..., :2 * n].reshape(*out.shape, 2)
        first = win[..., 0] >= win[..., 1]
        live = out > 0  # relu passes the window's maximum on
        mask = torch.empty_like(win)
        mask[..., 0] = first & live
        mask[..., 1] = ~first & live
        ctx.save_for_backward(mask)
        ctx.length = h.shape[-1]
        return out

    backward = _MaxPool1d.backward


def max_pool1d(h: torch.Tensor) -> torch.Tensor:
    """``F.max_pool1d(h, 2)``: the same values and gradients (torch's own call when no
    gradient is needed)."""
    if not (torch.is_grad_enabled() and h.requires_grad):
        return F.max_pool1d(h, 2)
    return _MaxPool1d.apply(h)


def relu_max_pool1d(h: torch.Tensor) -> torch.Tensor:
    """``F.max_pool1d(F.relu(h), 2)`` as one pass, with its values and gradients: relu and the
    maximum commute, and a window's first maximum of relu(h) with a positive value is its first
    maximum of h (where the maximum is not positive, relu's gradient is 0 at every position)."""
    if not (torch.is_grad_enabled() and h.requires_grad):
        return F.max_pool1d(h, 2).clamp_min_(0)
    return _ReluMaxPool1d.apply(h)
