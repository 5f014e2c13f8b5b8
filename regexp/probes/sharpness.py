"""Flatness, norm, margin and gradient-noise measures of the weights (no curvature matrix needed).

- ``rho_sharpness``: worst-case sharpness in a ρ-ball, to first order (Foret et al. 2021; Keskar
  et al. 2017 measure the same within a box): L(w + ε̂) − L(w) with SAM's ascent step
  ε̂ = ρ g/‖g‖ (ASAM's |w|-scaled one with ``adaptive``).
- ``average_sharpness``: E_z[L(w + σz)] − L(w), z ~ N(0, I), over n draws: the expected-sharpness
  term of the PAC-Bayes bounds (Neyshabur et al. 2017; Jiang et al. 2020, "Fantastic
  generalization measures").
- ``param_norms``: ‖w‖₂ of all parameters, of the weight matrices only, and the product of
  the weight matrices' Frobenius norms (the norm-based capacity of Neyshabur et al. 2015).
- ``margins``: the logit of the correct class minus the largest other logit, per example
  (Bartlett et al. 2017 normalize it by the spectral complexity; here it is raw); negative
  means misclassified.
- ``gradient_noise``: tr Σ, the trace of the covariance of one example's gradient, from the
  gradients of M equal microbatches of size b: Cov(ḡ_b) ≈ Σ/b, so tr Σ ≈ b · Σ_m ‖g_m − ḡ‖²/(M − 1).
  SGD with batch B sees gradient noise of covariance Σ/B, and its implicit regularizer (Smith
  et al. 2021) is (η/4)‖∇L‖² plus a term ∝ (η/B) tr Σ. The "simple noise scale" tr Σ/‖ḡ‖²
  is McCandlish et al. (2018)'s critical-batch-size estimate.

Every measurement restores the weights exactly and draws random numbers only from the
generator it is given, so a run's training never sees it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from regexp.optim.sam import perturbation, perturbed
from regexp.probes.base import MemberAxis, Probe, ProbeInputs, register

LossFn = Callable[[], torch.Tensor]
MARGIN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def rho_sharpness(loss_fn: LossFn, params: Sequence[torch.Tensor], rho: float, adaptive: bool = False,
                  eta: float = 0.01, members: int = 1, k: int = 1) -> List[float]:
    """One value per member: ``loss_fn`` gives the (M,) member losses (a lone model's, M = 1)
    and each member ascends along its own gradient, of its own norm (over all its ``k`` slices)."""
    with torch.enable_grad():
        loss = loss_fn().reshape(-1)
        grads = torch.autograd.grad(loss.sum(), list(params), allow_unused=True)
    owner = None if k == 1 else torch.arange(members * k, device=params[0].device) // k
    eps = perturbation(params, grads, rho, adaptive, eta, members * k, owner)
    with torch.no_grad(), perturbed(params, eps):
        return (loss_fn().reshape(-1) - loss.detach()).tolist()


@torch.no_grad()
def average_sharpness(loss_fn: LossFn, params: Sequence[torch.Tensor], sigma: float, samples: int,
                      generator: Union[torch.Generator, Sequence[torch.Generator]],
                      axis: Optional[MemberAxis] = None) -> List[float]:
    """E[L(w + σz)] − L(w), z ~ N(0, I), one value per member, from ``samples`` antithetic
    pairs: each draw z counts as the mean of L(w + σz) and L(w − σz). z and −z have one
    distribution, so the estimate stays unbiased, and the pair cancels the odd terms of L's
    expansion, first of all gᵀσz, whose variance σ²‖g‖² dominates a single draw's wherever the
    gradient is not 0 (on the default run 3 pairs err half as much as 10 single draws did).
    z is drawn parameter by parameter, in order, on the CPU ``generator`` (one per member, each
    drawing only its member's real entries: see :meth:`MemberAxis.randn`)."""
    gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
    axis = axis if axis is not None else MemberAxis(params)
    base = loss_fn().reshape(-1)
    totals = torch.zeros_like(base)
    for _ in range(samples):
        z = axis.randn(sigma, gens)
        for sign in (1.0, -1.0):
            with perturbed(params, z if sign > 0 else [-t for t in z]):
                totals += loss_fn().reshape(-1) - base
    return (totals / (2 * samples)).tolist()


def param_norms(params: Sequence[torch.Tensor], is_weight: Optional[Sequence[bool]] = None,
                members: int = 1, k: int = 1) -> Dict[str, List[float]]:
    """Per member: ‖w‖₂ of all parameters, of the weight matrices, and the product of the weight
    matrices' Frobenius norms (padding is zero: it adds nothing). A member of ``k`` slices (an
    ensemble's models) has all K models' weight matrices in its product, each its own norm."""
    is_weight = is_weight if is_weight is not None else [p.dim() >= 2 for p in params]
    sq = [p.double().pow(2).reshape(members * k, -1).sum(1) for p in params]  # per slice
    zero = torch.zeros(members * k, dtype=torch.float64, device=params[0].device)
    l2 = sum(sq, zero).view(members, k).sum(1).sqrt()
    l2_weights = sum((q for q, w in zip(sq, is_weight) if w), zero).view(members, k).sum(1).sqrt()
    product = torch.ones_like(zero)
    for q, w in zip(sq, is_weight):
        if w:
            product = product * q.sqrt()
    product = product.view(members, k).prod(1)
    return {"l2": l2.tolist(), "l2_weights": l2_weights.tolist(), "frobenius_product": product.tolist()}


@torch.no_grad()
def margins(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            batch: int) -> torch.Tensor:
    """Correct-class logit minus the largest other logit, one per example: (N,) for a lone
    model, (M, N) for members (``x`` (M, N, ...), ``y`` (M, N), logits (M, B, C))."""
    d = y.dim() - 1  # the examples' dimension
    out = []
    for i in range(0, y.shape[d], batch):
        logits = model(x.narrow(d, i, min(batch, y.shape[d] - i)))
        yb = y.narrow(d, i, min(batch, y.shape[d] - i)).unsqueeze(-1)
        correct = logits.gather(-1, yb).squeeze(-1)
        other = logits.scatter(-1, yb, float("-inf")).amax(-1)
        out.append(correct - other)
    return torch.cat(out, d)


def margin_summary(m: torch.Tensor) -> Dict[str, float]:
    """Quantiles of the margins and the fraction that is not positive (the training error,
    ties counted as errors)."""
    q = torch.quantile(m.double().cpu(), torch.tensor(MARGIN_QUANTILES, dtype=torch.float64))
    out = {f"q{round(100 * p):02d}": float(v) for p, v in zip(MARGIN_QUANTILES, q)}
    out["nonpositive"] = float((m <= 0).double().mean())
    return out


def microbatch_grads(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, parts: int, axis: Optional[MemberAxis] = None) -> torch.Tensor:
    """The flat gradient of each of ``parts`` equal consecutive microbatches, (parts, M, P)
    float64 (M = 1 for a lone model; members' examples along ``y``'s last dimension); examples
    beyond parts · ⌊n/parts⌋ are left out, so all microbatches have one size."""
    axis = axis if axis is not None else MemberAxis(params)
    d = y.dim() - 1
    b = y.shape[d] // parts
    rows: List[torch.Tensor] = []
    with torch.enable_grad():
        for m in range(parts):
            loss = loss_of(x.narrow(d, m * b, b), y.narrow(d, m * b, b))
            grads = torch.autograd.grad(loss.sum(), list(params), allow_unused=True)
            rows.append(axis.flat(grads, torch.float64))
    return torch.stack(rows)


def gradient_noise(grads: torch.Tensor, microbatch: int) -> Dict[str, List[float]]:
    """tr Σ of one example's gradient from M ≥ 2 microbatch-mean gradients (``grads`` (M, members,
    P)) of ``microbatch`` examples each, with ‖ḡ‖² and the simple noise scale tr Σ/‖ḡ‖², per member."""
    M = grads.shape[0]
    if M < 2:
        raise ValueError("gradient_noise needs at least 2 microbatch gradients")
    mean = grads.mean(0)
    trace = microbatch * ((grads - mean) ** 2).sum((0, 2)) / (M - 1)
    g2 = mean.pow(2).sum(1)
    scale = torch.where(g2 > 0, trace / g2, torch.full_like(g2, float("inf")))
    return {"trace": trace.tolist(), "grad_norm_sq": g2.tolist(), "simple_scale": scale.tolist()}


@register
class SharpnessProbe(Probe):
    name = "sharpness"

    @dataclass
    class Config:
        rho: float = 0.05  # radius of the worst-case ball (SAM's default, Foret et al. 2021)
        adaptive: bool = False  # ASAM's |w|-scaled ball (then rho ~ 0.5 is comparable)
        eta: float = 0.01  # ASAM's offset in T_w = |w| + eta
        sigma: float = 0.01  # std of the Gaussian weight noise
        samples: int = 3  # draws z of the noise, each evaluated at w ± σz (antithetic pairs)
        noise_microbatches: int = 10  # microbatches of the probe batch for tr Σ

    ranges = {"rho": (lambda v: v > 0, "a number > 0"), "eta": (lambda v: v >= 0, "a number >= 0"),
              "sigma": (lambda v: v > 0, "a number > 0"), "samples": (lambda v: v >= 1, "an integer >= 1"),
              "noise_microbatches": (lambda v: v >= 2, "an integer >= 2")}

    def measure(self, inputs: ProbeInputs, generators: Sequence[torch.Generator]) -> List[Dict[str, float]]:
        c, ax = self.cfg, inputs.axis
        per_key: Dict[str, List[float]] = {}
        with torch.no_grad():
            per_key["sharpness/loss"] = inputs.loss().tolist()
        per_key["sharpness/rho"] = rho_sharpness(inputs.loss, inputs.params, c.rho, c.adaptive, c.eta, ax.members,
                                                 ax.k)
        per_key["sharpness/average"] = average_sharpness(inputs.loss, inputs.params, c.sigma, c.samples,
                                                         generators, ax)
        per_key.update({f"norm/{k}": v for k, v in param_norms(inputs.params, inputs.is_weight, ax.members,
                                                               ax.k).items()})
        m = margins(inputs.model, inputs.x_train, inputs.y_train, inputs.eval_batch_size).reshape(ax.members, -1)
        n = inputs.y.shape[-1]
        parts = min(c.noise_microbatches, n)
        grads = microbatch_grads(inputs.loss_of, inputs.params, inputs.x, inputs.y, parts, ax)
        per_key.update({f"grad_noise/{k}": v for k, v in gradient_noise(grads, n // parts).items()})
        out = []
        for i in range(ax.members):
            row = {k: v[i] for k, v in per_key.items() if not k.startswith("grad_noise/")}
            row.update({f"margin/{k}": v for k, v in margin_summary(m[i]).items()})
            row.update({k: v[i] for k, v in per_key.items() if k.startswith("grad_noise/")})
            out.append(row)
        return out
