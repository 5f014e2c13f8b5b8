"""Data augmentation, drawn fresh for every training batch on the device (no per-example loop).

- 1-D signals (N, C, L): a random shift by an integer d ∈ [−shift, shift] and a random time
  scaling by s ∈ [1 − scale, 1 + scale] about the centre, read with linear interpolation;
  positions beyond the ends repeat the edge value.
- Images (N, C, H, W): a random crop of the image zero-padded by ``shift`` pixels (a random
  translation) and, with ``flip``, a horizontal flip with probability 1/2.

The population transforms each member's batch with :func:`draws` and :func:`augment`
(regexp/population/transforms.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from regexp.regularizers.base import Regularizer, register


def shift_scale_1d(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out[n, :, t] = x[n, :, (t − c)/sₙ + c − dₙ] (linear interpolation, edges clamped)."""
    n, c, length = x.shape
    t = torch.arange(length, device=x.device, dtype=x.dtype)
    centre = (length - 1) / 2
    src = ((t - centre) / scale[:, None] + centre - shift[:, None]).clamp(0, length - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=length - 1)
    frac = (src - lo).unsqueeze(1)
    gather = lambda i: x.gather(2, i.unsqueeze(1).expand(n, c, length))  # noqa: E731
    return gather(lo) * (1 - frac) + gather(hi) * frac


def crop_2d(x: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """A (H, W) window at (top, left) of each image zero-padded by ``pad`` on every side."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def draws(n: int, image: bool, shift: int, scale: float, flip: bool, device: torch.device,
          dtype: torch.dtype, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """One batch's random numbers, in the order a lone run draws them from ``generator`` (None:
    the global one): 1-D ``shift`` d and ``scale`` s; images ``top``/``left`` (with a shift) and
    ``flip`` (with flip). A population draws each member's from that member's own generator."""
    if not image:
        d = torch.randint(-shift, shift + 1, (n,), device=device, generator=generator).to(dtype)
        s = 1 + scale * (2 * torch.rand(n, device=device, dtype=dtype, generator=generator) - 1)
        return {"shift": d, "scale": s}
    out = {}
    if shift:
        out["top"], out["left"] = (torch.randint(0, 2 * shift + 1, (n,), device=device, generator=generator)
                                   for _ in range(2))
    if flip:
        out["flip"] = torch.rand(n, device=device, generator=generator) < 0.5
    return out


def augment(x: torch.Tensor, d: Dict[str, torch.Tensor], pad: int) -> torch.Tensor:
    """The transformation of (N, C, L) signals or (N, C, H, W) images by per-example ``draws``
    (``pad``: the crop's zero padding; a window at top = left = pad is the image itself, so
    examples drawn with a smaller shift s are cropped at offsets shifted by pad − s)."""
    if x.dim() == 3:
        return shift_scale_1d(x, d["shift"], d["scale"])
    if "top" in d:
        x = crop_2d(x, pad, d["top"], d["left"])
    if "flip" in d:
        x = torch.where(d["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    return x


@register
class Augmentation(Regularizer):
    name = "augmentation"

    @dataclass
    class Config:
        shift: int = 3  # 1-D: max shift in positions; images: padding of the random crop
        scale: float = 0.1  # 1-D only: time scaling in [1 − scale, 1 + scale]
        flip: bool = True  # images only: horizontal flip with probability 1/2

    ranges = {"shift": (lambda v: v >= 0, "an integer >= 0"),
              "scale": (lambda v: 0 <= v < 1, "a number in [0, 1)")}
