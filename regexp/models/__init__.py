"""Models chosen by name (``model=mlp|cnn|gru|transformer``) through a registry.

Every model takes inputs shaped ``(N, C, L)`` (1-D signals such as MNIST-1D) or
``(N, C, H, W)`` (images) and returns class logits. Hidden activations pass through
:class:`~regexp.models.sites.Site` modules, the points where regularizers such as dropout or
activity penalties attach without the model knowing about them.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch.nn as nn

from regexp.errors import ConfigError
from regexp.models.init import INITS, init_weights
from regexp.models.layers import ACTIVATIONS
from regexp.models.sites import Site, sites

MODELS: Dict[str, Callable[..., nn.Module]] = {}
NORMS = {
    "mlp": ("none", "batch", "layer"),
    "cnn": ("none", "batch", "layer", "instance"),
    "transformer": ("layer",),
}


def register_model(name: str):
    def deco(builder):
        MODELS[name] = builder
        return builder
    return deco


def build_model(cfg, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build ``cfg.name`` for inputs of ``input_shape`` (without the batch dimension)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name={cfg.name!r} is unknown: expected one of {', '.join(MODELS)}")
    model = MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
    init_weights(model, cfg.init, cfg.get("init_std", 0.01), cfg.get("init_a"))
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Importing the modules fills the registry.
from regexp.models import cnn, gru, mlp, transformer  # noqa: E402,F401

__all__ = ["ACTIVATIONS", "INITS", "MODELS", "NORMS", "Site", "build_model", "count_params",
           "register_model", "sites"]
