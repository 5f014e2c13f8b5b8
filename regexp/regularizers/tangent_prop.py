"""Tangent propagation: penalise how fast the output moves along a known invariance of the input.

Simard et al. 1992 ("Tangent Prop"); Goodfellow et al., Deep Learning §7.14:

    Ω = λ · (1/B) Σᵢ Σ_v ‖J_x f(xᵢ) · v(xᵢ)‖²,

f the model's logits, J_x f their Jacobian with respect to the input and v(x) the tangent of a
transformation T_a that leaves the class unchanged (T_0 = identity), estimated by a central
finite difference of the very transformation data augmentation applies
(:mod:`regexp.regularizers.augmentation`), at the smallest meaningful step:

- ``shift`` (1-D and images): v = (T(+1) − T(−1)) / 2, T shifting by one sample/pixel; images
  have two tangents, horizontal and vertical (the zero-padded crop of the augmentation).
- ``scale`` (1-D only): v = (T(1 + δ) − T(1 − δ)) / 2, T stretching time about the centre by
  the factor 1 ± δ (``scale_step``; 0.05 moves the ends of a length-40 signal by one sample).

So each tangent is the change of the input per step, not per unit of the transformation's
parameter, and λ weighs the shift and the stretch alike. The mean over the batch (not
Goodfellow's sum) keeps λ independent of the batch size.

J·v comes from the double-backward trick: with g(u) = ∇_x (uᵀ f(x)) = Jᵀu, J·v = ∇_u (g(u)·v),
two backward passes with ``create_graph`` on an extra forward pass of the batch (whatever the
model; that pass draws its own dropout masks, and batch norm's running statistics see the
batch twice). Where data augmentation makes the network invariant to
sampled transformations, tangent propagation asks for the infinitesimal invariance analytically
at the training points themselves. The penalty is written once (``batch_penalty_of``): a
population runs the same double backward on its stacked forward (inputs (M, B, D), members
independent, so each member's J·v is its own), with λ per member; its extra pass draws fresh
dropout masks, weight noise and DropConnect masks from each member's generator, as the lone
run's does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Union

import torch

from regexp.errors import ConfigError
from regexp.regularizers.augmentation import crop_2d, shift_scale_1d
from regexp.regularizers.base import Batch, Regularizer, member_sum, register

TANGENTS = ("shift", "scale")


def tangents(x: torch.Tensor, names: List[str], scale_step: Union[float, torch.Tensor]) -> List[torch.Tensor]:
    """The tangent vectors of the batch ``x`` (N, C, L) or (N, C, H, W), one per invariance
    (``scale_step``: one δ, or (N,), one per example)."""
    n = len(x)
    if x.dim() == 3:
        zero, one = torch.zeros(n, dtype=x.dtype, device=x.device), torch.ones(n, dtype=x.dtype, device=x.device)
        out = []
        for name in names:
            if name == "shift":
                out.append((shift_scale_1d(x, one, one) - shift_scale_1d(x, -one, one)) / 2)
            else:
                out.append((shift_scale_1d(x, zero, one + scale_step) - shift_scale_1d(x, zero, one - scale_step)) / 2)
        return out
    # images: a window at (1 + dy, 1 + dx) of the image padded by one pixel is the image shifted
    # by (−dy, −dx); only shift is allowed here (checked at set-up)
    full = lambda v: torch.full((n,), v, dtype=torch.long, device=x.device)  # noqa: E731
    crop = lambda top, left: crop_2d(x, 1, full(top), full(left))  # noqa: E731
    return [(crop(1, 0) - crop(1, 2)) / 2, (crop(0, 1) - crop(2, 1)) / 2]


def tangent_products(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     vs: List[torch.Tensor]) -> List[torch.Tensor]:
    """J_x f(x) · v for every tangent v (each shaped as ``x``), as tensors shaped as f(x),
    differentiable in the parameters. ``forward`` is a model, or a population's stacked forward
    (x: (M, B, D); members are independent, so ∇_x of the sum is each member's own Jᵀu)."""
    x = x.detach().requires_grad_(True)
    out = forward(x)
    u = torch.zeros_like(out, requires_grad=True)
    (jtu,) = torch.autograd.grad((out * u).sum(), x, create_graph=True)
    return [torch.autograd.grad((jtu * v).sum(), u, create_graph=True)[0] for v in vs]


@register
class TangentProp(Regularizer):
    name = "tangent_prop"

    @dataclass
    class Config:
        lam: float = 0.01
        tangents: List[str] = field(default_factory=lambda: ["shift"])
        scale_step: float = 0.05  # δ of the scale tangent, 1-D only

    ranges = {"lam": (lambda v: v >= 0, "a number >= 0"),
              "tangents": (lambda v: len(v) > 0 and all(t in TANGENTS for t in v),
                           "a non-empty list of " + ", ".join(TANGENTS)),
              "scale_step": (lambda v: 0 < v < 1, "a number in (0, 1)")}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        shape = tuple(ctx.input_shape)
        if len(shape) not in (2, 3):
            raise ConfigError(f"regularizer.tangent_prop needs signals (C, L) or images (C, H, W); "
                              f"this data set's inputs have shape {shape}")
        if len(shape) == 3 and list(cfg.tangents) != ["shift"]:
            raise ConfigError(f"regularizer.tangent_prop.tangents={list(cfg.tangents)} is invalid for images: "
                              "expected [shift] (scale is defined for 1-D signals)")

    @classmethod
    def batch_penalty_of(cls, batch: Batch, hp, stacked: bool) -> torch.Tensor:
        """λ·(1/B)·Σᵢ Σ_v ‖J·vᵢ‖²: a 0-dim value, or (M,) per member (λ: (M,)) when ``stacked``."""
        x = batch.x
        examples = x.reshape(-1, *batch.input_shape)  # the stacked inputs are flat (M, B, D)
        step = hp.scale_step
        if torch.is_tensor(step):  # a population's δ per member: each of its B examples takes it
            step = step.to(x.dtype).repeat_interleave(x.shape[1])
        vs = [v.reshape(x.shape) for v in tangents(examples, list(hp.tangents), step)]
        jv = tangent_products(batch.forward, x, vs)
        return hp.lam * sum(member_sum(p.pow(2), stacked) for p in jv) / x.shape[int(stacked)]
