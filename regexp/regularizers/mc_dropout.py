"""Monte-Carlo dropout evaluation: the mean of T stochastic passes' class probabilities.

The weight-scaling rule (the default evaluation) runs one deterministic pass; MC dropout keeps
the dropout masks on at test time (``Site.mc``) and averages p(y | x, mask) over T masks, the
ensemble view Σ_μ p(μ) p(y | x, μ) of dropout.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.models.sites import sites


@torch.no_grad()
def mc_predict(model: nn.Module, x: torch.Tensor, samples: int, batch: int = 4096) -> torch.Tensor:
    """Mean class probabilities over ``samples`` stochastic passes, model otherwise in eval mode."""
    was_training = model.training
    model.eval()
    for s in sites(model):
        s.mc = True
    try:
        probs = []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            probs.append(sum(F.softmax(model(xb), 1) for _ in range(samples)) / samples)
        return torch.cat(probs)
    finally:
        for s in sites(model):
            s.mc = False
        model.train(was_training)


def mc_evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int,
                batch: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy −ln p̄(y|x) and accuracy of the MC-averaged prediction p̄."""
    p = mc_predict(model, x, samples, batch)
    loss = -torch.log(p.gather(1, y[:, None]).clamp_min(1e-12)).mean()
    return loss, (p.argmax(1) == y).float().mean()
