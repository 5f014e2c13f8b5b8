"""Attachment points for regularizers that act on activations.

A model routes its input and each hidden activation through a :class:`Site`. By default a
site is the identity; dropout sets ``p`` on it, activity penalties set ``record`` to read
the activation back. The model code stays free of regularizer logic.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Site(nn.Module):
    def __init__(self, kind: str = "hidden"):
        super().__init__()
        self.kind = kind  # "input" or "hidden"
        self.p = 0.0  # inverted-dropout probability
        self.mc = False  # keep dropout active in eval mode (Monte-Carlo dropout)
        self.record = False
        self.last: Optional[torch.Tensor] = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.p > 0 and (self.training or self.mc):
            h = F.dropout(h, self.p, training=True)
        if self.record:
            self.last = h
        return h

    def extra_repr(self) -> str:
        return f"kind={self.kind}, p={self.p}"


def sites(model: nn.Module, kind: Optional[str] = None) -> List[Site]:
    return [m for m in model.modules() if isinstance(m, Site) and (kind is None or m.kind == kind)]


def hidden_sites(model: nn.Module, regularizer: str) -> List[Site]:
    """The hidden sites ``regularizer`` acts on; a model without any (an MLP of depth 0,
    logistic regression) is refused, so the regularizer never silently does nothing."""
    from regexp.errors import ConfigError

    found = sites(model, "hidden")
    if not found:
        raise ConfigError(f"regularizer.{regularizer} acts on hidden units, but this model has none "
                          "(model.depth=0 is logistic regression): expected model.depth >= 1")
    return found
