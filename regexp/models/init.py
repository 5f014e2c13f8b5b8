"""Weight initialization schemes (``model.init``).

``default`` keeps PyTorch's own (Kaiming-uniform with a=sqrt(5)); the others set every
Linear/Conv weight and zero the biases. n_in and n_out are a layer's fan-in and fan-out
(for a convolution: channels × kernel size).

- ``xavier`` (uniform): U(±√(6/(n_in+n_out))); ``xavier_normal``: N(0, 2/(n_in+n_out)).
  Both have variance 2/(n_in+n_out), the compromise between keeping the forward and the
  backward variance for an activation of unit slope at 0 (Glorot & Bengio 2010, eq. 16).
- ``he`` (normal): N(0, 2/n_in); ``he_uniform``: U(±√(6/n_in)). Variance 2/n_in makes up
  for ReLU zeroing half its inputs (He et al. 2015).
- ``normal``: N(0, init_std²).
- ``uniform``: U(−a, a) with a = ``init_a``; ``init_a: null`` takes a = 1/√n_in, the
  "commonly used heuristic" Glorot & Bengio (2010, eq. 1) measure Xavier against.
- ``zeros``: every weight 0, the textbook case where symmetry is never broken.

The names without a suffix keep their first meaning (``xavier`` uniform, ``he`` normal), so
configs written before the other variants existed still mean what they meant.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from regexp.errors import ConfigError

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _uniform(w: torch.Tensor, bound: float) -> None:
    w.uniform_(-bound, bound)


def _normal(w: torch.Tensor, std: float) -> None:
    w.normal_(0.0, std)


# name -> fill(weight, fan_in, fan_out, init_std, init_a)
_SCHEMES: Dict[str, Callable[[torch.Tensor, int, int, float, Optional[float]], None]] = {
    "xavier": lambda w, fi, fo, std, a: _uniform(w, math.sqrt(6.0 / (fi + fo))),
    "xavier_normal": lambda w, fi, fo, std, a: _normal(w, math.sqrt(2.0 / (fi + fo))),
    "he": lambda w, fi, fo, std, a: _normal(w, math.sqrt(2.0 / fi)),
    "he_uniform": lambda w, fi, fo, std, a: _uniform(w, math.sqrt(6.0 / fi)),
    "normal": lambda w, fi, fo, std, a: _normal(w, std),
    "uniform": lambda w, fi, fo, std, a: _uniform(w, a if a is not None else 1.0 / math.sqrt(fi)),
    "zeros": lambda w, fi, fo, std, a: w.zero_(),
}
INITS = ("default", *_SCHEMES)


def fans(w: torch.Tensor):
    """(fan_in, fan_out) of a Linear or Conv weight: the inputs and outputs one weight touches."""
    receptive = w[0][0].numel()
    return w.shape[1] * receptive, w.shape[0] * receptive


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str, std: float = 0.01, a: Optional[float] = None) -> None:
    if scheme not in INITS:
        raise ConfigError(f"model.init={scheme!r} is invalid: expected one of {', '.join(INITS)}")
    if scheme == "default":
        return
    fill = _SCHEMES[scheme]
    for m in model.modules():
        if not isinstance(m, _LAYERS):
            continue
        fill(m.weight, *fans(m.weight), std, a)
        if m.bias is not None:
            m.bias.zero_()
