"""Shared by the activity penalties: the hidden activations of the last forward pass."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from regexp.models.sites import hidden_sites, sites


def record_hidden(model: nn.Module, regularizer: str) -> None:
    for s in hidden_sites(model, regularizer):
        s.record = True


def hidden_activations(model: nn.Module) -> List[torch.Tensor]:
    return [s.last for s in sites(model, "hidden") if s.last is not None]
