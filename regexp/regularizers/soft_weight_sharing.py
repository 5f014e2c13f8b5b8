"""Soft weight sharing (Nowlan & Hinton 1992; Bishop, *Deep Learning* §9.4.1).

The weights get a learned Gaussian-mixture prior p(w) = ∏ᵢ Σⱼ πⱼ 𝒩(wᵢ | μⱼ, σⱼ²) and the loss
gets λ·Ω(w) with Ω = −Σᵢ ln Σⱼ πⱼ 𝒩(wᵢ | μⱼ, σⱼ²). The mixture is trained with the weights
through unconstrained parameters: πⱼ = softmax(η)ⱼ (always a distribution), σⱼ² = exp(ξⱼ)
(always positive), μⱼ free; they form their own optimizer group with their own learning rate.
Autograd of Ω gives exactly Bishop's gradients (9.25, 9.26, 9.28, 9.31), which the tests check.

λ = τ/N. The data loss is the *mean* cross-entropy over a batch, while Ω is a sum over all
weights: as a log-posterior, N·E + Ω, the prior would weigh λ = 1/N, and Ullrich, Meeds &
Welling (2017) down-weight it further by τ < 1, −log p(data|w) − τ log p(w). With λ fixed
instead, a prior strong enough for a small training set swamps a large one. Near λ = 1/N
(1e-4 on MNIST-1D's 3600 examples) the learned means and the weights run together into two or
three values (Ω → −∞ as they meet and σ → 0) and the network falls to chance: τ is a few
thousandths.

Compression variant (Ullrich et al. 2017): ``zero_component`` pins one component at μ₀ = 0 with
π₀ = ``pi0`` (fixed unless ``learn_pi0``). After training, components whose means lie closer
than ``merge_distance`` are merged into one (π summed, mean and variance moment-matched; a
group holding the zero component keeps μ = 0), and ``quantize`` snaps every weight to the mean
of its most responsible merged component and reports the accuracy of that model, the number
of distinct values, the fraction of zeros and the storage compression.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.regularizers.base import Regularizer, member_sum, register

_LOG_2PI = math.log(2 * math.pi)


def log_joint(w: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """ln πⱼ + ln 𝒩(wᵢ | μⱼ, σⱼ²), shape (*w.shape, K): (n, K) for one model's weights and (K,)
    components; (M, n, K) for a population's (M, n) weights and (M, 1, K) components."""
    w = w[..., None]
    return log_pi - 0.5 * (_LOG_2PI + log_var + (w - mu) ** 2 * torch.exp(-log_var))


def mixture_terms(free_mu: torch.Tensor, xi: torch.Tensor, eta: torch.Tensor, zero: bool, learn_pi0: bool,
                  pi0: Union[float, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ, ln σ², ln π) of the unconstrained parameters, over their last dimension (one mixture's
    (K,) or a population's stacked (M, 1, K)); component 0 pinned at μ = 0 when ``zero``.
    ``pi0``: one value, or a population's (M, 1, 1) float64 values, one per member."""
    mu = torch.cat([free_mu.new_zeros(*free_mu.shape[:-1], 1), free_mu], -1) if zero else free_mu
    if zero and not learn_pi0 and torch.is_tensor(pi0):
        # the logs in float64, then rounded once, as the lone run's Python floats are
        rest = F.log_softmax(eta[..., 1:], -1) + torch.log1p(-pi0).to(eta.dtype)
        log_pi = torch.cat([torch.log(pi0).to(eta.dtype).expand(*eta.shape[:-1], 1), rest], -1)
    elif zero and not learn_pi0:  # π₀ fixed, the rest share 1 − π₀
        rest = F.log_softmax(eta[..., 1:], -1) + math.log1p(-pi0)
        log_pi = torch.cat([eta.new_full((*eta.shape[:-1], 1), math.log(pi0)), rest], -1)
    else:
        log_pi = F.log_softmax(eta, -1)
    return mu, xi, log_pi


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

    def terms(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mixture_terms(self.free_mu, self.xi, self.eta, self.zero, self.learn_pi0, self.pi0)

    @property
    def mu(self) -> torch.Tensor:
        return self.terms()[0]

    def log_pi(self) -> torch.Tensor:
        return self.terms()[2]

    def joint(self, w: torch.Tensor) -> torch.Tensor:
        return log_joint(w, self.mu, self.xi, self.log_pi())

    def omega(self, w: torch.Tensor) -> torch.Tensor:
        """Ω(w) = −Σᵢ ln Σⱼ πⱼ 𝒩(wᵢ | μⱼ, σⱼ²)."""
        return -torch.logsumexp(self.joint(w), 1).sum()

    def responsibilities(self, w: torch.Tensor) -> torch.Tensor:
        """γⱼ(wᵢ), eq. 9.24."""
        return torch.softmax(self.joint(w), 1)

    def components(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ, σ², π), detached."""
        return self.mu.detach(), self.xi.detach().exp(), self.log_pi().detach().exp()


def merge(mu: torch.Tensor, var: torch.Tensor, pi: torch.Tensor, distance: float,
          zero: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge components whose means lie within ``distance`` of a neighbour (sorted by mean, so a
    chain of close means becomes one component): π summed, μ and σ² those of the group's
    two-moment match. With ``zero`` the group holding component 0 keeps μ = 0, so that the
    weights it claims stay exact zeros. Returned sorted by mean."""
    order = torch.argsort(mu)
    groups: List[List[int]] = []
    for j in order.tolist():
        if groups and mu[j] - mu[groups[-1][-1]] < distance:
            groups[-1].append(j)
        else:
            groups.append([j])
    out_mu, out_var, out_pi = [], [], []
    for g in groups:
        p = pi[g]
        m = (p * mu[g]).sum() / p.sum()
        if zero and 0 in g:
            m = torch.zeros_like(m)
        out_mu.append(m)
        out_var.append((p * (var[g] + (mu[g] - m) ** 2)).sum() / p.sum())
        out_pi.append(p.sum())
    return torch.stack(out_mu), torch.stack(out_var), torch.stack(out_pi)


def quantize(w: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Each weight replaced by the mean of its most responsible component (argmaxⱼ γⱼ(wᵢ))."""
    j = log_joint(w.reshape(-1), mu, var.log(), pi.log()).argmax(1)
    return mu[j].reshape(w.shape)


def density(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """The mixture density Σⱼ πⱼ 𝒩(x | μⱼ, σⱼ²) at each x."""
    return torch.logsumexp(log_joint(x, mu, var.log(), pi.log()), 1).exp()


def storage_bits(tensors: List[torch.Tensor], index_bits: int = 5) -> int:
    """Bits to store quantized sparse weights as Han, Mao & Dally (2016) do before Huffman coding:
    per layer, each non-zero as (gap to the previous non-zero in ``index_bits``, codebook index in
    ⌈log₂ d⌉ bits), a gap too long for ``index_bits`` bridged by stored zeros, and its number of
    entries as a 32-bit integer; plus the codebook of d distinct non-zero values as 32-bit floats."""
    values = torch.unique(torch.cat([t.reshape(-1) for t in tensors]))
    values = values[values != 0]
    code_bits = max(math.ceil(math.log2(max(len(values), 1))), 1)
    entries = 0
    span = 2 ** index_bits
    for t in tensors:
        pos = torch.nonzero(t.reshape(-1)).reshape(-1)
        gaps = torch.diff(pos, prepend=pos.new_full((1,), -1))
        entries += len(pos) + int(((gaps - 1) // span).sum())
    return entries * (index_bits + code_bits) + 32 * len(tensors) + 32 * len(values)


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
        components: int = 16  # K, including the zero component when there is one
        tau: float = 0.005  # λ = tau / n_train (Ullrich et al. 2017's τ)
        lr: float = 1e-3  # learning rate of the mixture's own optimizer group
        init_sigma: float = 0.0  # 0: (range of the initial weights) / K
        zero_component: bool = False
        pi0: float = 0.99  # π of the zero component
        learn_pi0: bool = False
        layers: List[str] = field(default_factory=list)  # substrings of parameter names; []: all
        include_biases: bool = False
        # Gamma(α, β) hyperprior on each precision 1/σⱼ² (Ullrich et al. 2017): without one a
        # component can widen to swallow the weights or narrow onto one; α = 0: none
        gamma_alpha: float = 0.0
        gamma_beta: float = 0.0
        merge_distance: float = 1e-3  # after training, merge components whose means are this close
        quantize: bool = False

    ranges = {
        "components": (lambda v: v >= 1, "an integer >= 1"),
        "tau": (lambda v: v >= 0, "a number >= 0"),
        "lr": (lambda v: v > 0, "a number > 0"),
        "init_sigma": (lambda v: v >= 0, "a number >= 0 (0: from the weight range)"),
        "pi0": (lambda v: 0 < v < 1, "a number in (0, 1)"),
        "merge_distance": (lambda v: v >= 0, "a number >= 0 (0: no merging)"),
        "gamma_alpha": (lambda v: v == 0 or v >= 1, "0 (no hyperprior) or a number >= 1"),
        "gamma_beta": (lambda v: v >= 0, "a number >= 0"),
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
        self.initial = w.cpu().clone()  # for the figure: the weights the prior started from
        lo, hi = w.min().item(), w.max().item()
        free = c.components - int(c.zero_component)
        means = torch.linspace(lo, hi, free) if free > 1 else torch.tensor([(lo + hi) / 2])
        sigma = c.init_sigma or max(hi - lo, 1e-3) / c.components
        self.mixture = Mixture(means, sigma, c.zero_component, c.pi0, c.learn_pi0).to(w.device)
        self.lam = c.tau / max(self.ctx.n_train, 1)
        self._tb, self._epoch = None, 0

    def _weights(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    def param_groups(self) -> List[dict]:
        return [{"params": list(self.mixture.parameters()), "lr": self.cfg.lr}]

    def hypers(self, lam, free_mu: torch.Tensor, xi: torch.Tensor, eta: torch.Tensor, masks=None) -> SimpleNamespace:
        """What ``penalty_of`` reads: this config's values with the given λ and mixture parameters
        (a population's: (M,) λ, (M, 1, K) parameters, and each weight's real entries)."""
        c = self.cfg
        return SimpleNamespace(lam=lam, free_mu=free_mu, xi=xi, eta=eta, zero=c.zero_component,
                               learn_pi0=c.learn_pi0, pi0=c.pi0, gamma_alpha=c.gamma_alpha,
                               gamma_beta=c.gamma_beta, masks=masks)

    @classmethod
    def penalty_of(cls, params, hp, stacked: bool) -> torch.Tensor:
        """λ·Ω(w), plus the hyperprior: one model's covered weights and (K,) mixture, or a
        population's stacked (M, ...) weights, each member with its own (M, 1, K) mixture and λ.
        ``hp.masks`` (stacked, or None) marks each weight's real entries: a padded weight is zero,
        but a zero weight has a finite mixture log-likelihood, so it must not count."""
        mu, log_var, log_pi = mixture_terms(hp.free_mu, hp.xi, hp.eta, hp.zero, hp.learn_pi0, hp.pi0)
        flat = (lambda t: t.reshape(len(t), -1)) if stacked else (lambda t: t.reshape(-1))
        w = torch.cat([flat(p) for p in params], -1)
        nll = -torch.logsumexp(log_joint(w, mu, log_var, log_pi), -1)
        if stacked and hp.masks is not None:
            nll = nll * torch.cat([flat(m) for m in hp.masks], -1)
        omega = member_sum(nll, stacked)
        if torch.is_tensor(hp.gamma_alpha) or hp.gamma_alpha:
            omega = omega + cls.hyperprior_of(hp, stacked)
        return hp.lam * omega

    @staticmethod
    def hyperprior_of(hp, stacked: bool) -> torch.Tensor:
        """− ln Gamma(1/σⱼ² | α, β) summed over the components, up to a constant (ln(1/σ²) = −ξ)."""
        alpha, beta, xi = hp.gamma_alpha, hp.gamma_beta, hp.xi
        if torch.is_tensor(alpha):  # a population's own (M, 1, 1) float64 values; α = 0: none
            on = (alpha != 0).to(xi.dtype)
            return member_sum(((alpha - 1).to(xi.dtype) * xi + beta.to(xi.dtype) * torch.exp(-xi)) * on, stacked)
        return member_sum((alpha - 1) * xi + beta * torch.exp(-xi), stacked)

    # ---- after training
    def merged(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ, σ², π) of the learned mixture after merging close components."""
        mu, var, pi = self.mixture.components()
        if self.cfg.merge_distance > 0:
            return merge(mu, var, pi, self.cfg.merge_distance, self.cfg.zero_component)
        return mu, var, pi

    @torch.no_grad()
    def snap(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose covered weights are the means of their most responsible
        (merged) components."""
        snapped = copy.deepcopy(model)
        names = {id(p): n for n, p in model.named_parameters()}
        targets = dict(snapped.named_parameters())
        mu, var, pi = self.merged()
        for p in self.params:
            targets[names[id(p)]].copy_(quantize(p, mu, var, pi))
        return snapped

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        out = {f"soft_weight_sharing/{k}": v for k, v in self._mixture_values().items()}
        out["soft_weight_sharing/merged_components"] = len(self.merged()[0])
        snapped = self.snap(model) if self.cfg.quantize else None
        if self.ctx.out_dir is not None:
            self._figure(snapped)
        if snapped is None:
            return out
        ws = [p.detach() for p in covered(snapped, list(self.cfg.layers), self.cfg.include_biases)]
        w = torch.cat([p.reshape(-1) for p in ws])
        out["soft_weight_sharing/distinct_values"] = int(torch.unique(w).numel())
        out["soft_weight_sharing/zero_fraction"] = (w == 0).float().mean().item()
        out["soft_weight_sharing/compression"] = 32 * w.numel() / storage_bits(ws)
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

    def figure_data(self, bins: int = 100, points: int = 1000) -> Dict[str, torch.Tensor]:
        """What ``mixture.png`` draws: the weight histogram as a density, the merged mixture's
        density on a grid over the weights' range (±3σ), and the quantized means."""
        w = self._weights().detach().cpu()
        mu, var, pi = (t.cpu() for t in self.merged())
        lo = min(w.min().item(), (mu - 3 * var.sqrt()).min().item())
        hi = max(w.max().item(), (mu + 3 * var.sqrt()).max().item())
        x = torch.linspace(lo, hi, points, dtype=torch.float64)
        counts, edges = torch.histogram(w.double(), bins=bins, range=(lo, hi), density=True)
        return {"x": x, "density": density(x, mu.double(), var.double(), pi.double()),
                "hist": counts, "edges": edges, "mu": mu, "pi": pi, "weights": w}

    def _figure(self, snapped) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = self.figure_data()
        fig, ax = plt.subplots(figsize=(7, 4))
        floor = 1e-3
        init = torch.histogram(self.initial.double(), bins=d["edges"], density=True)[0]
        ax.stairs(init.clamp_min(floor), d["edges"], color="0.6", label="weights when the prior was attached")
        ax.stairs(d["hist"].clamp_min(floor), d["edges"], fill=True, alpha=0.5, color="tab:blue",
                  label="weights after training")
        ax.plot(d["x"], d["density"].clamp_min(floor), color="tab:red",
                label="learned prior Σⱼ πⱼ N(w | μⱼ, σⱼ²)")
        for j, m in enumerate(d["mu"].tolist()):
            ax.axvline(m, color="k", lw=0.6, ls=":", label="component means (quantized values)" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("weight value")
        ax.set_ylabel("density (log scale)")
        title = f"soft weight sharing: {len(d['mu'])} components after merging"
        if snapped is not None:
            w = torch.cat([p.detach().reshape(-1) for p in covered(snapped, list(self.cfg.layers),
                                                                   self.cfg.include_biases)])
            title += f", {(w == 0).float().mean().item():.1%} zeros"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.ctx.out_dir / "mixture.png", dpi=110)
        if self._tb is not None:
            self._tb.figure("soft_weight_sharing/mixture", fig, self._epoch)
        plt.close(fig)

    @torch.no_grad()
    def _mixture_values(self) -> Dict[str, float]:
        m = self.mixture
        vals = {}
        for name, t in (("pi", m.log_pi().exp()), ("mu", m.mu), ("sigma", (0.5 * m.xi).exp())):
            vals.update({f"{name}_{j}": v for j, v in enumerate(t.tolist())})
        return vals

    def log(self, writer, epoch: int) -> None:
        self._tb, self._epoch = writer, epoch  # the final figure goes into the same event file
        writer.scalars({f"soft_weight_sharing/{k}": v for k, v in self._mixture_values().items()}, epoch)
        if writer.writer is not None and epoch % 5 == 0:  # histograms are large; every 5 epochs
            writer.writer.add_histogram("soft_weight_sharing/weights", self._weights().detach().cpu(), epoch)

    def state_dict(self):
        return {"mixture": self.mixture.state_dict()}

    def load_state_dict(self, state) -> None:
        self.mixture.load_state_dict(state["mixture"])
