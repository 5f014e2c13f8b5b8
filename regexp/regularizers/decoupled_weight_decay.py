"""Decoupled weight decay (Loshchilov & Hutter's AdamW): w ← w − ηλw in the update itself.

The shrink happens after the gradient is computed and before the optimizer step, so the
update is w_{t+1} = w_t − η(u_t + λw_t) with u_t the optimizer's own step direction: for
Adam exactly torch's AdamW, for plain SGD exactly L2 decay. Under Adam an L2 penalty's
gradient λw is divided by √v̂ like any gradient, so heavily-updated weights are barely decayed;
here every weight shrinks by the same factor 1 − ηλ. η is the optimizer's current (scheduled)
learning rate of the weight's group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from regexp.regularizers.base import Regularizer, register
from regexp.regularizers.l1 import NONNEG


@register
class DecoupledWeightDecay(Regularizer):
    name = "decoupled_weight_decay"

    @dataclass
    class Config:
        lam: float = 1e-2  # per unit of learning rate, as AdamW's weight_decay
        exclude_bias_and_norm: bool = True

    ranges = {"lam": NONNEG}

    @staticmethod
    @torch.no_grad()
    def shrink_(params, lr, lam) -> None:
        """w ← (1 − ηλ)·w, written once for both engines: η and λ floats for a lone model's
        parameters, or (M,) float64 tensors for a population's stacked ones (leading dimension:
        the member), the factor formed in float64 and rounded to float32 once either way."""
        factor = 1.0 - lr * lam
        if not isinstance(factor, torch.Tensor):
            torch._foreach_mul_(params, factor)
            return
        for p in params:
            p.mul_(factor.to(p.dtype).view(-1, *([1] * (p.dim() - 1))))

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"decoupled_weight_decay/shrink": 1.0 - self.ctx.optimizer.param_groups[0]["lr"]
                        * self.cfg.lam}, epoch)
