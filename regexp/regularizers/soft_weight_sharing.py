"""Soft weight sharing (Nowlan & Hinton 1992; Bishop, *Deep Learning* §9.4.1).

The weights get a learned Gaussian-mixture prior p(w) = ∏ᵢ Σⱼ πⱼ 𝒩(wᵢ | μⱼ, σⱼ²) and the loss
gets λ·Ω(w) with Ω = −Σᵢ ln Σⱼ πⱼ 𝒩(wᵢ | μⱼ, σⱼ²). The mixture is trained with the weights
through unconstrained parameters: πⱼ = softmax(η)ⱼ (always a distribution), σⱼ² = exp(ξⱼ)
(always positive), μⱼ free; they form their own optimizer group with their own learning rate.
Autograd of Ω gives exactly Bishop's gradients (9.25, 9.26, 9.28, 9.31), which the tests check.

Compression variant (Ullrich, Meeds & Welling 2017): ``zero_component`` pins one component at
μ₀ = 0 with π₀ = ``pi0`` (fixed unless ``learn_pi0``). ``quantize`` snaps every weight to the mean
of its most responsible component after training and reports the accuracy of that model.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.regularizers.base import Regularizer, register

_LOG_2PI = math.log(2 * math.pi)


class Mixture(nn.Module):
    """K one-dimensional Gaussians; component 0 is pinned at μ = 0 when ``zero`` is set."""

    def __init__(self, means: torch.Tensor, sigma: float, zero: bool = False, pi0: float = 0.99,
                 learn_pi0: bool = False):
        super().__init__()
        self.zero, self.learn_pi0 = zero, learn_pi0
        k = len(means) + int(zero)
        self.free_mu = nn.Parameter(means.clone())
        self.xi = nn.Parameter(torch.full((k,), 2 * math.log(sigma)))
        eta = torch.zeros(k)
        if zero:  # η₀ such that softmax gives π₀ = pi0 when π₀ is learned with the others
            eta[0] = math.log(pi0 * (k - 1) / (1 - pi0)) if k > 1 else 0.0
        self.eta = nn.Parameter(eta)
        self.pi0 = pi0

    @property
    def mu(self) -> torch.Tensor:
        return torch.cat([self.free_mu.new_zeros(1), self.free_mu]) if self.zero else self.free_mu

    def log_pi(self) -> torch.Tensor:
        if self.zero and not self.learn_pi0:  # π₀ fixed, the rest share 1 − π₀
            rest = F.log_softmax(self.eta[1:], 0) + math.log1p(-self.pi0)
            return torch.cat([self.eta.new_full((1,), math.log(self.pi0)), rest])
        return F.log_softmax(self.eta, 0)

    def joint(self, w: torch.Tensor) -> torch.Tensor:
        """ln πⱼ + ln 𝒩(wᵢ | μⱼ, σⱼ²), shape (len(w), K)."""
        w = w[:, None]
        log_norm = -0.5 * (_LOG_2PI + self.xi + (w - self.mu) ** 2 * torch.exp(-self.xi))
        return self.log_pi() + log_norm

    def omega(self, w: torch.Tensor) -> torch.Tensor:
        """Ω(w) = −Σᵢ ln Σⱼ πⱼ 𝒩(wᵢ | μⱼ, σⱼ²)."""
        return -torch.logsumexp(self.joint(w), 1).sum()

    def responsibilities(self, w: torch.Tensor) -> torch.Tensor:
        """γⱼ(wᵢ), eq. 9.24."""
        return torch.softmax(self.joint(w), 1)


def covered(model: nn.Module, layers: List[str], include_biases: bool) -> List[nn.Parameter]:
    """The weights under the prior: names containing one of ``layers`` (all when empty)."""
    return [p for n, p in model.named_parameters()
            if p.requires_grad and (p.dim() >= 2 or include_biases)
            and (not layers or any(s in n for s in layers))]


@register
class SoftWeightSharing(Regularizer):
    name = "soft_weight_sharing"

    @dataclass
    class Config:
        components: int = 8  # K, including the zero component when there is one
        lam: float = 1e-4
        lr: float = 1e-3  # learning rate of the mixture's own optimizer group
        init_sigma: float = 0.0  # 0: (range of the initial weights) / K
        zero_component: bool = False
        pi0: float = 0.99  # π of the zero component
        learn_pi0: bool = False
        layers: List[str] = field(default_factory=list)  # substrings of parameter names; []: all
        include_biases: bool = False
        quantize: bool = False

    ranges = {
        "components": (lambda v: v >= 1, "an integer >= 1"),
        "lam": (lambda v: v >= 0, "a number >= 0"),
        "lr": (lambda v: v > 0, "a number > 0"),
        "init_sigma": (lambda v: v >= 0, "a number >= 0 (0: from the weight range)"),
        "pi0": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    }

    @classmethod
    def validate(cls, cfg, prefix: str) -> None:
        super().validate(cfg, prefix)
        if cfg.zero_component and cfg.components < 2:
            from regexp.errors import ConfigError
            raise ConfigError(f"{prefix}.components={cfg.components!r} is invalid: expected an integer "
                              ">= 2 with zero_component=true (the zero component and one more)")

    def attach(self, model) -> None:
        c = self.cfg
        self.params = covered(model, list(c.layers), c.include_biases)
        if not self.params:
            from regexp.errors import ConfigError
            raise ConfigError(f"regularizer.soft_weight_sharing.layers={list(c.layers)!r} is invalid: "
                              "it matches no weights; expected substrings of parameter names")
        w = self._weights().detach()
        lo, hi = w.min().item(), w.max().item()
        free = c.components - int(c.zero_component)
        means = torch.linspace(lo, hi, free) if free > 1 else torch.tensor([(lo + hi) / 2])
        sigma = c.init_sigma or max(hi - lo, 1e-3) / c.components
        self.mixture = Mixture(means, sigma, c.zero_component, c.pi0, c.learn_pi0).to(w.device)

    def _weights(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    def param_groups(self) -> List[dict]:
        return [{"params": list(self.mixture.parameters()), "lr": self.cfg.lr}]

    def penalty(self, model) -> torch.Tensor:
        return self.cfg.lam * self.mixture.omega(self._weights())

    # ---- after training
    @torch.no_grad()
    def snap(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose covered weights are the means of their most responsible components."""
        snapped = copy.deepcopy(model)
        names = {id(p): n for n, p in model.named_parameters()}
        targets = dict(snapped.named_parameters())
        mu = self.mixture.mu
        for p in self.params:
            j = self.mixture.responsibilities(p.reshape(-1)).argmax(1)
            targets[names[id(p)]].copy_(mu[j].reshape(p.shape))
        return snapped

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        out = {f"soft_weight_sharing/{k}": v for k, v in self._mixture_values().items()}
        if not self.cfg.quantize:
            return out
        snapped = self.snap(model)
        w = torch.cat([p.reshape(-1) for p in covered(snapped, list(self.cfg.layers),
                                                       self.cfg.include_biases)])
        out["soft_weight_sharing/distinct_values"] = int(torch.unique(w).numel())
        out["soft_weight_sharing/zero_fraction"] = (w == 0).float().mean().item()
        for split in ("val", "test"):
            x, y = tensors[split]
            if len(y):
                loss, acc = evaluate(snapped, x, y)
                out[f"soft_weight_sharing/quantized_{split}_acc"] = acc.item()
                out[f"soft_weight_sharing/quantized_{split}_loss"] = loss.item()
        if self.ctx.out_dir is not None:
            from regexp.train.io import save_torch
            save_torch(self.ctx.out_dir / "quantized_model.pt", snapped.state_dict())
        return out

    @torch.no_grad()
    def _mixture_values(self) -> Dict[str, float]:
        m = self.mixture
        vals = {}
        for name, t in (("pi", m.log_pi().exp()), ("mu", m.mu), ("sigma", (0.5 * m.xi).exp())):
            vals.update({f"{name}_{j}": v for j, v in enumerate(t.tolist())})
        return vals

    def log(self, writer, epoch: int) -> None:
        writer.scalars({f"soft_weight_sharing/{k}": v for k, v in self._mixture_values().items()}, epoch)
        if writer.writer is not None and epoch % 5 == 0:  # histograms are large; every 5 epochs
            writer.writer.add_histogram("soft_weight_sharing/weights", self._weights().detach().cpu(), epoch)

    def state_dict(self):
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state) -> None:
        self.mixture.load_state_dict(state["mixture"])
