"""Adversarial training with FGSM (Goodfellow et al. 2015): x' = x + ε · sign(∇ₓ L(x, y)).

In each training batch a fraction ``mix`` of the examples (the batch is already shuffled, so
the first ones) is replaced by its FGSM version against the current model; the loss is then
(1 − mix)·L(clean) + mix·L(adversarial), Goodfellow's mixed objective. The report gives the
test accuracy on clean and on FGSM inputs side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.regularizers.base import Regularizer, register


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Move every input by exactly ε along the sign of the loss's input gradient."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")  # sum: the sign ignores the scale
        (grad,) = torch.autograd.grad(loss, x)  # parameters' .grad stay untouched
    return (x + eps * grad.sign()).detach()


@register
class Adversarial(Regularizer):
    name = "adversarial"

    @dataclass
    class Config:
        eps: float = 0.1
        mix: float = 0.5  # fraction of each batch replaced by its FGSM examples
        eval_batch_size: int = 1024

    ranges = {"eps": (lambda v: v >= 0, "a number >= 0"),
              "mix": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
              "eval_batch_size": (lambda v: v >= 1, "an integer >= 1")}

    def transform_batch(self, x, y, model):
        k = round(self.cfg.mix * len(x))
        if k == 0 or self.cfg.eps == 0:
            return x, y
        x_adv = fgsm(model, x[:k], y[:k], self.cfg.eps)
        return torch.cat([x_adv, x[k:]]), y

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        x, y = tensors["test"]
        if not len(y):
            return {}
        was_training = model.training
        model.eval()
        b = self.cfg.eval_batch_size
        x_adv = torch.cat([fgsm(model, x[i:i + b], y[i:i + b], self.cfg.eps) for i in range(0, len(y), b)])
        model.train(was_training)
        clean_loss, clean_acc = evaluate(model, x, y)
        adv_loss, adv_acc = evaluate(model, x_adv, y)
        return {"adversarial/clean_test_acc": clean_acc.item(), "adversarial/fgsm_test_acc": adv_acc.item(),
                "adversarial/clean_test_loss": clean_loss.item(), "adversarial/fgsm_test_loss": adv_loss.item()}

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"adversarial/eps": self.cfg.eps}, epoch)
