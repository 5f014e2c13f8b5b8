"""Masked-segment reconstruction: a self-supervised pretext task for 1-D signals (Prince,
*Understanding Deep Learning* §9.3.7; the signal analogue of BERT's masked words and of
inpainting).

Each training signal x ∈ ℝ^{C×L} has one segment of ``segment`` consecutive positions, its start
uniform over the L − segment + 1 possible ones, overwritten with ``fill``; the network sees the
rest and its output layer, replaced by one with C·L outputs (the reconstruction head), predicts
the whole signal. The loss replaces the cross-entropy and ignores the labels:

    ℒ = Σ_n Σ_c Σ_{t ∈ S_n} (f(x̃_n)_{c,t} − x_{n,c,t})² / (C · Σ_n |S_n|)

the mean squared error over the masked positions S_n only (the visible ones would be copied).
Only the trunk (every layer but ``head``) is meant to be kept: ``transfer`` with this run's
``model.pt`` loads the trunk and leaves the classifier's head, of another shape, fresh.

The trainer's ``loss/*`` and ``acc/*`` curves of such a run compare the C·L reconstruction
outputs with the digit labels and mean nothing; the pretext's own numbers are in
``metrics.json``'s ``extra``: the masked MSE on the test signals (one fixed mask per signal) and,
as a yardstick, that of predicting each position's mean over the training signals.

In a population (MLPs) each member's model is built through ``wrap_model`` (its stacked head has
C·L outputs), its segments are drawn from its own generator in the lone run's order (before the
step's noise and dropout draws, see :mod:`regexp.population.pretext`) and its data loss is
``masked_mse`` per member; ``report`` runs on each member's lone model, as alone.

Masked reconstruction rather than a contrastive pair loss: its target is the signal itself, so
it needs no negatives or large batches, no choice of augmentations whose invariances must match
the labels', and its loss is exact to test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from regexp.errors import ConfigError
from regexp.regularizers.base import Regularizer, member_sum, register


def segment_mask(n: int, length: int, segment: int, generator: Optional[torch.Generator] = None,
                 device=None) -> torch.Tensor:
    """(n, length) booleans, True on ``segment`` consecutive positions per row, the start of each
    uniform over the ``length − segment + 1`` possible ones."""
    start = torch.randint(0, length - segment + 1, (n, 1), generator=generator, device=device)
    pos = torch.arange(length, device=device)
    return (pos >= start) & (pos < start + segment)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, stacked: bool = False) -> torch.Tensor:
    """Mean squared error over the masked positions (``mask``: (n, L), shared by the C channels)
    of a prediction (n, C·L or C×L) of ``target`` (n, C, L); stacked (a leading member dimension
    on all three): each member's, as an (M,) tensor."""
    err = (pred.reshape(target.shape) - target).pow(2) * mask.unsqueeze(-2)
    return member_sum(err, stacked) / (member_sum(mask, stacked) * target.shape[-2])


def hide(x: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """``x`` (..., C, L) with the positions of ``mask`` (..., L) overwritten by ``fill`` in every channel."""
    return x.masked_fill(mask.unsqueeze(-2), fill)


@register
class MaskedReconstruction(Regularizer):
    name = "masked_reconstruction"

    @dataclass
    class Config:
        segment: int = 10  # masked positions per signal (a quarter of MNIST-1D's 40)
        fill: float = 0.0  # written over them: the data's mean (MNIST-1D is centred)

    ranges = {"segment": (lambda v: v >= 1, "an integer >= 1 (the length of the masked segment)")}

    def wrap_model(self, model: nn.Module) -> nn.Module:
        shape = tuple(self.ctx.input_shape)
        if len(shape) != 2:
            raise ConfigError(f"regularizer=[masked_reconstruction] is invalid for inputs of shape {shape}: "
                              "expected 1-D signals (channels, length), such as data=mnist1d")
        if self.cfg.segment >= shape[1]:
            raise ConfigError(f"regularizer.masked_reconstruction.segment={self.cfg.segment} is invalid: "
                              f"expected an integer in [1, {shape[1] - 1}] (the signal has {shape[1]} positions)")
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"regularizer=[masked_reconstruction] is invalid for model.name="
                              f"{self.ctx.model_cfg.name}: expected a model whose output layer is "
                              "a Linear named head")
        # the reconstruction head: one output per position of the signal
        model.head = nn.Linear(head.in_features, shape[0] * shape[1], bias=head.bias is not None).to(
            head.weight.device)
        return model

    @torch.no_grad()
    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        x, _ = tensors["test"]
        g = torch.Generator(device=x.device).manual_seed(self.ctx.seed)  # the same masks every time
        mask = segment_mask(len(x), x.shape[-1], self.cfg.segment, g, x.device)
        was = model.training
        model.eval()
        pred = model(hide(x, mask, self.cfg.fill))
        model.train(was)
        mean = tensors["train"][0].mean(0, keepdim=True).expand_as(x)
        return {"masked_reconstruction/test_mse": masked_mse(pred, x, mask).item(),
                "masked_reconstruction/test_mse_position_mean": masked_mse(mean, x, mask).item()}
