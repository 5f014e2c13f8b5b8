"""Convolution as one matrix product (im2col), the course report's §4 view of a conv layer.

Every receptive field of the (zero-padded) input is unfolded into one column of a matrix X̂ of
shape (C_in·k₁·…, L_out); the kernels, flattened the same way, are the rows of a matrix W of
shape (C_out, C_in·k₁·…); the convolution is then W X̂ (+ b), reshaped to the output map. Each
spatial dimension of size n gives ⌊(n + 2p − d(k − 1) − 1)/s⌋ + 1 outputs (kernel k, padding p,
stride s, dilation d; with d = 1 this is ⌊(n + 2p − k)/s⌋ + 1). The same W multiplies every
column: that is parameter sharing, C_out·C_in·k weights however long the input.

Written with slicing only (no ``unfold``), so the check against ``torch.nn.functional.conv1d``
and ``conv2d`` compares two independent computations.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Ints = Union[int, Sequence[int]]


def out_size(n: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Outputs of one spatial dimension: ⌊(n + 2p − d(k − 1) − 1)/s⌋ + 1."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _per_dim(v: Ints, dims: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims


def im2col(x: torch.Tensor, kernel: Ints, stride: Ints = 1, padding: Ints = 0,
           dilation: Ints = 1) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C·∏k, ∏out): one column per output position, rows ordered
    channel first, then kernel offsets in row-major order (as ``weight.reshape(C_out, -1)``)."""
    dims = x.dim() - 2
    k, s, p, d = (_per_dim(v, dims) for v in (kernel, stride, padding, dilation))
    # F.pad lists the last dimension first
    xp = F.pad(x, [q for pd in reversed(p) for q in (pd, pd)])
    outs = [out_size(n, *args) for n, args in zip(x.shape[2:], zip(k, s, p, d))]
    rows = []
    for offset in itertools.product(*(range(kk) for kk in k)):
        # the input value each output position sees at this kernel offset: start d·j, step s
        idx = tuple(slice(dd * j, dd * j + ss * (o - 1) + 1, ss) for j, dd, ss, o in zip(offset, d, s, outs))
        rows.append(xp[(slice(None), slice(None), *idx)].reshape(x.shape[0], x.shape[1], -1))
    cols = torch.stack(rows, dim=2)  # (N, C, ∏k, ∏out)
    return cols.reshape(x.shape[0], -1, cols.shape[-1])


def conv_im2col(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: Ints = 1, padding: Ints = 0, dilation: Ints = 1) -> torch.Tensor:
    """conv1d / conv2d (groups=1) computed as W X̂ + b."""
    dims = x.dim() - 2
    kernel = tuple(weight.shape[2:])
    cols = im2col(x, kernel, stride, padding, dilation)
    out = weight.reshape(weight.shape[0], -1) @ cols  # (C_out, C·∏k) @ (N, C·∏k, L) -> (N, C_out, L)
    if bias is not None:
        out = out + bias[:, None]
    s, p, d = (_per_dim(v, dims) for v in (stride, padding, dilation))
    spatial = [out_size(n, *args) for n, args in zip(x.shape[2:], zip(kernel, s, p, d))]
    return out.reshape(x.shape[0], weight.shape[0], *spatial)
