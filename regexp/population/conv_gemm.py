"""Members' convolutions as one batched GEMM on a feature-major layout (StackedCNN's ``gemm`` form).

Activations are (M, C, B, *spatial): member, channel, then every position of the batch, so a
stage is ONE ``baddbmm`` of the members' (C_out, C_in·k^d) weights (their stored layout) against
(C_in·k^d, positions) columns, the batch × positions the long contiguous side of MKL's thin
GEMMs. The columns come from a zero-padded copy of the input whose positions, examples
included, lie in one flat row per channel: kernel tap j is that row shifted by a fixed offset,
so the columns are k^d shifted slices stacked. Positions that straddle two examples (or run past
the end) compute junk that is never read; their gradients are zero, so they add nothing to any
weight or input gradient. Stride 1 only.

oneDNN's grouped convolutions have a large fixed cost per call when groups hold few channels
(measured on a 2-core Xeon, batch 100, length 40: 0.26 ms for 3 members' 1→2-channel
convolution against 0.06 ms here), while for wider ones (32→64) they are faster than
this form's extra copies (padding, columns, their fold in the backward). StackedCNN measures
which form a bucket runs (regexp/population/tuning.py). The backward is hand-written and once
differentiable: the probes' and the batch penalties' double backward use the grouped form.
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence

import torch


def offsets(kernel: int, padded: Sequence[int]) -> List[int]:
    """Each kernel tap's offset in the flat padded positions, taps in the weight's
    (row-major) order."""
    strides = [math.prod(padded[i + 1:]) for i in range(len(padded))]
    return [sum(i * st for i, st in zip(tap, strides)) for tap in itertools.product(range(kernel), repeat=len(padded))]


def _inner(flat: torch.Tensor, shape: Sequence[int], padding: int) -> torch.Tensor:
    """The unpadded (M, C, B, *spatial) view inside the flat padded rows ``flat``."""
    m, c, b, *s = shape
    sp = [n + 2 * padding for n in s]
    grid = flat[:, :, :b * math.prod(sp)].view(m, c, b, *sp)
    return grid[(Ellipsis, *[slice(padding, padding + n) for n in s])]


class StackedConv(torch.autograd.Function):
    """Convolutions (stride 1, zero ``padding``) of h (M, C_in, B, *spatial) with weights
    (M, C_out, C_in·k^d) and bias (M, 1, C_out) or None: (M, C_out, B, *padded spatial), whose
    leading ``spatial + 2·padding - k + 1`` positions per dimension are the output."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], kernel: int,
                padding: int) -> torch.Tensor:
        m, c, b, *s = h.shape
        sp = [n + 2 * padding for n in s]
        offs = offsets(kernel, sp)
        n = b * math.prod(sp)
        flat = h.new_zeros(m, c, n + offs[-1])
        _inner(flat, h.shape, padding).copy_(h)
        # channel-major, taps minor: nn.Conv's weight order, so the stored weights multiply as they are
        cols = torch.stack([flat[:, :, o:o + n] for o in offs], 2).view(m, c * len(offs), n)
        out = torch.baddbmm(bias.transpose(1, 2), w, cols) if bias is not None else torch.bmm(w, cols)
        ctx.save_for_backward(w, cols)
        ctx.meta = (offs, n, tuple(h.shape), padding, bias is not None)
        return out.view(m, w.shape[1], b, *sp)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: torch.Tensor):
        w, cols = ctx.saved_tensors
        offs, n, shape, padding, has_bias = ctx.meta
        m, c = shape[0], shape[1]
        g = gout.reshape(m, w.shape[1], n)
        gh = gw = gb = None
        if ctx.needs_input_grad[0]:
            # each tap's columns are a shifted slice of the padded input: their gradient adds back there
            gcols = torch.bmm(w.transpose(1, 2), g).view(m, c, len(offs), n)
            flat = g.new_zeros(m, c, n + offs[-1])
            for j, o in enumerate(offs):
                flat[:, :, o:o + n] += gcols[:, :, j]
            gh = _inner(flat, shape, padding)
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(g, cols.transpose(1, 2))
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(2).unsqueeze(1)
        return gh, gw, gb, None, None
