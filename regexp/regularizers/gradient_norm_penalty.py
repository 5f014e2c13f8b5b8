"""Gradient-norm penalty: the implicit regularization of (stochastic) gradient descent, made explicit.

Gradient descent with step α follows, to second order in α, the gradient flow of the modified
loss L + (α/4)‖∇L‖² (Barrett & Dherin 2021, "Implicit gradient regularization"; Prince, UDL
§9.2). This regularizer adds that term with a free weight λ, computed on the training batch by
double backward (the penalty's gradient is λ·2·H∇L, a Hessian-vector product):

- ``mode: full``: Ω = λ‖∇_θ L_B‖², L_B the loss of the whole training batch. With
  λ = α/4 a small-step run follows what gradient descent with step α does implicitly.
- ``mode: sgd``: Ω = λ·(1/k)·Σⱼ ‖∇_θ L_j‖², L_j the cross-entropy of the j-th of k equal
  micro-batches of the batch (Smith et al. 2021, "On the origin of implicit regularization in
  stochastic gradient descent"): the term SGD with k minibatches per batch adds, which is the
  ``full`` term plus the micro-batch gradients' variance, (1/k)·Σⱼ ‖∇L_j − ∇L_B‖².
  A batch with fewer than k examples uses one micro-batch per example; dropout draws new masks
  for the micro-batches' forward passes.

Every trainable parameter enters the norm (the implicit term has no notion of weights vs biases).
Costs about three backward passes per step (``full``) or k + 2 (``sgd``). Written once
(``batch_penalty_of``): in a population each member's norm is that of its own loss's gradient
with respect to its own slices of the stacked parameters (members are independent, so the
gradient of the summed losses is each member's own), with λ per member; ``sgd``'s micro-batch
passes draw fresh dropout masks, weight noise and DropConnect masks from each member's
generator, as the lone run's do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from regexp.regularizers.base import Batch, Regularizer, member_sum, register

MODES = ("full", "sgd")


def squared_grad_norm(loss: torch.Tensor, params: List[torch.Tensor], stacked: bool = False) -> torch.Tensor:
    """‖∂loss/∂params‖², differentiable with respect to the parameters (create_graph); stacked:
    (M,) losses of independent members, each member's norm over its slices of the parameters."""
    grads = torch.autograd.grad(loss.sum(), params, create_graph=True)
    return sum(member_sum(g.pow(2), stacked) for g in grads)


@register
class GradientNormPenalty(Regularizer):
    name = "gradient_norm_penalty"

    @dataclass
    class Config:
        lam: float = 0.01
        mode: str = "full"
        micro_batches: int = 4  # k, for mode=sgd

    ranges = {"lam": (lambda v: v >= 0, "a number >= 0"),
              "mode": (lambda v: v in MODES, " or ".join(MODES)),
              "micro_batches": (lambda v: v >= 1, "an integer >= 1")}

    @classmethod
    def batch_penalty_of(cls, batch: Batch, hp, stacked: bool) -> torch.Tensor:
        """Ω of a lone step (0-dim), or of each member of a stacked one ((M,), λ: (M,))."""
        if hp.mode == "full":
            return hp.lam * squared_grad_norm(batch.loss, batch.params, stacked)
        dim = int(stacked)  # the batch dimension
        k = min(hp.micro_batches, batch.y.shape[dim])
        norms = [squared_grad_norm(batch.data_loss(batch.forward(xj), yj), batch.params, stacked)
                 for xj, yj in zip(torch.tensor_split(batch.x, k, dim), torch.tensor_split(batch.y, k, dim))]
        return hp.lam * sum(norms) / k
