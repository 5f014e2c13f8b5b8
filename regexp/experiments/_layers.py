"""Per-layer diagnostics of a network on one batch: activation spread and weight-gradient norms.

Glorot & Bengio (2010), Goodfellow ch. 8 and Prince ch. 7 diagnose vanishing and exploding
gradients by how the spread of the hidden activations and the gradient norm of each layer's
weights change with depth. The model is rebuilt exactly as the trainer builds it (same
seeding, same ``build_model``), so the "init" numbers describe the network the run starts
from, whichever engine trains it (population members start from these same weights).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.models import build_model, sites
from regexp.train.trainer import seed_everything


def initial_model(model_cfg, seed: int, input_shape, num_classes: int) -> nn.Module:
    """The network a run with ``seed`` starts from (the trainer seeds, then builds)."""
    seed_everything(seed)
    return build_model(model_cfg, input_shape, num_classes)


def layer_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, list]:
    """Std of each hidden activation and norm of each weight matrix's gradient, input to output;
    ``acts`` holds the hidden activations themselves (for histograms).

    Runs in training mode (batch normalization uses the batch's statistics, as in a step).
    """
    hidden = sites(model, "hidden")
    for s in hidden:
        s.record = True
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    acts = [s.last.detach() for s in hidden]
    act_std = [float(a.std()) for a in acts]
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    grad_norm = [float(w.grad.norm()) for w in weights]
    for s in hidden:
        s.record, s.last = False, None
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {"act_std": act_std, "grad_norm": grad_norm, "acts": acts}
