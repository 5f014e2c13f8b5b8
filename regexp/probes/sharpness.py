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
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn

from regexp.optim.sam import perturbation, perturbed
from regexp.probes.base import Probe, ProbeInputs, register

LossFn = Callable[[], torch.Tensor]
MARGIN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def rho_sharpness(loss_fn: LossFn, params: Sequence[torch.Tensor], rho: float, adaptive: bool = False,
                  eta: float = 0.01) -> float:
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    eps = perturbation(params, grads, rho, adaptive, eta)
    with torch.no_grad(), perturbed(params, eps):
        return float(loss_fn() - loss.detach())


@torch.no_grad()
def average_sharpness(loss_fn: LossFn, params: Sequence[torch.Tensor], sigma: float, samples: int,
                      generator: torch.Generator) -> float:
    """Mean over ``samples`` draws of L(w + σz) − L(w); z is drawn parameter by parameter, in
    order, on the CPU ``generator``."""
    base = loss_fn()
    total = 0.0
    for _ in range(samples):
        z = [sigma * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
        with perturbed(params, z):
            total += float(loss_fn() - base)
    return total / samples


@torch.no_grad()
def param_norms(model: nn.Module) -> Dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if p.dim() >= 2]
    sq = lambda ps: float(sum(p.double().pow(2).sum() for p in ps)) if ps else 0.0  # noqa: E731
    product = 1.0
    for w in weights:
        product *= float(w.double().norm())
    return {"l2": sq(params) ** 0.5, "l2_weights": sq(weights) ** 0.5, "frobenius_product": product}


@torch.no_grad()
def margins(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            batch: int) -> torch.Tensor:
    """Correct-class logit minus the largest other logit, one per example."""
    out = []
    for i in range(0, len(y), batch):
        logits = model(x[i:i + batch])
        yb = y[i:i + batch]
        correct = logits.gather(1, yb[:, None]).squeeze(1)
        other = logits.scatter(1, yb[:, None], float("-inf")).amax(1)
        out.append(correct - other)
    return torch.cat(out)


def margin_summary(m: torch.Tensor) -> Dict[str, float]:
    """Quantiles of the margins and the fraction that is not positive (the training error,
    ties counted as errors)."""
    q = torch.quantile(m.double().cpu(), torch.tensor(MARGIN_QUANTILES, dtype=torch.float64))
    out = {f"q{round(100 * p):02d}": float(v) for p, v in zip(MARGIN_QUANTILES, q)}
    out["nonpositive"] = float((m <= 0).double().mean())
    return out


def microbatch_grads(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, parts: int) -> torch.Tensor:
    """The flat gradient of each of ``parts`` equal consecutive microbatches, (parts, P) float64;
    examples beyond parts · ⌊n/parts⌋ are left out, so all microbatches have one size."""
    b = len(y) // parts
    rows: List[torch.Tensor] = []
    with torch.enable_grad():
        for m in range(parts):
            loss = loss_of(x[m * b:(m + 1) * b], y[m * b:(m + 1) * b])
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                                   for p, g in zip(params, grads)]))
    return torch.stack(rows)


def gradient_noise(grads: torch.Tensor, microbatch: int) -> Dict[str, float]:
    """tr Σ of one example's gradient from M ≥ 2 microbatch-mean gradients (rows of ``grads``)
    of ``microbatch`` examples each, with ‖ḡ‖² and the simple noise scale tr Σ/‖ḡ‖²."""
    M = grads.shape[0]
    if M < 2:
        raise ValueError("gradient_noise needs at least 2 microbatch gradients")
    mean = grads.mean(0)
    trace = microbatch * float(((grads - mean) ** 2).sum()) / (M - 1)
    g2 = float(mean.pow(2).sum())
    return {"trace": trace, "grad_norm_sq": g2, "simple_scale": trace / g2 if g2 > 0 else float("inf")}


@register
class SharpnessProbe(Probe):
    name = "sharpness"

    @dataclass
    class Config:
        rho: float = 0.05  # radius of the worst-case ball (SAM's default, Foret et al. 2021)
        adaptive: bool = False  # ASAM's |w|-scaled ball (then rho ~ 0.5 is comparable)
        eta: float = 0.01  # ASAM's offset in T_w = |w| + eta
        sigma: float = 0.01  # std of the Gaussian weight noise
        samples: int = 10  # draws of the noise
        noise_microbatches: int = 10  # microbatches of the probe batch for tr Σ

    ranges = {"rho": (lambda v: v > 0, "a number > 0"), "eta": (lambda v: v >= 0, "a number >= 0"),
              "sigma": (lambda v: v > 0, "a number > 0"), "samples": (lambda v: v >= 1, "an integer >= 1"),
              "noise_microbatches": (lambda v: v >= 2, "an integer >= 2")}

    def measure(self, inputs: ProbeInputs, generator: torch.Generator) -> Dict[str, float]:
        c = self.cfg
        with torch.no_grad():
            out = {"sharpness/loss": float(inputs.loss())}
        out["sharpness/rho"] = rho_sharpness(inputs.loss, inputs.params, c.rho, c.adaptive, c.eta)
        out["sharpness/average"] = average_sharpness(inputs.loss, inputs.params, c.sigma, c.samples, generator)
        out.update({f"norm/{k}": v for k, v in param_norms(inputs.model).items()})
        m = margins(inputs.model, inputs.x_train, inputs.y_train, inputs.eval_batch_size)
        out.update({f"margin/{k}": v for k, v in margin_summary(m).items()})
        parts = min(c.noise_microbatches, len(inputs.y))
        grads = microbatch_grads(inputs.loss_of, inputs.params, inputs.x, inputs.y, parts)
        out.update({f"grad_noise/{k}": v for k, v in gradient_noise(grads, len(inputs.y) // parts).items()})
        return out
