"""Curvature of the loss at the current weights, from Hessian-vector products alone.

The Hessian of a network with P parameters is P × P (225 M entries for the default MLP's
15 k weights), so it is never formed: every estimate below needs only the product Hv, which
double backward gives at about twice the cost of a gradient (Pearlmutter 1994):
Hv = ∇_w (∇_w L · v). On that product:

- ``lanczos``: the Krylov basis of H with full reorthogonalization; its tridiagonal matrix T
  has the Ritz values, whose extremes converge first to H's extreme eigenvalues (Golub & Van
  Loan 2013, §10.1). With as many steps as parameters they are H's spectrum, exactly.
- ``top_eigenvalues``: the k largest Ritz values (the sharpest directions); the probe takes
  them from the density's first Lanczos run, which costs no extra product.
- ``power_iteration``: the alternative (``top_method: power``), power iteration with deflation.
- ``hutchinson_trace``: tr H = E[vᵀHv] for Rademacher v (Hutchinson 1990), with its standard
  error over the samples.
- ``slq``: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Yao et al. 2020,
  PyHessian): from a random unit start v, vᵀ f(H) v ≈ Σᵢ τᵢ f(θᵢ), with θᵢ the Ritz values and
  τᵢ the squared first components of T's eigenvectors; averaged over runs this is the
  spectral density, which ``density`` smooths with a Gaussian of width σ.

All vectors are kept in float64 (reorthogonalization loses precision in float32); only the
products run in the parameters' dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from regexp.probes.base import Probe, ProbeInputs, register

MatVec = Callable[[torch.Tensor], torch.Tensor]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def hvp_operator(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> MatVec:
    """v ↦ Hv for the Hessian of ``loss`` w.r.t. ``params``, v a flat float64 vector.

    The gradient's graph is built once (``create_graph``) and kept, so each product is one
    backward pass through it, not a new forward pass.
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    g = flat([torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)])
    dtype = params[0].dtype

    def apply(v: torch.Tensor) -> torch.Tensor:
        if not g.requires_grad:  # the loss is linear in the parameters: H = 0
            return torch.zeros_like(v)
        hv = torch.autograd.grad(g, params, grad_outputs=v.to(dtype), retain_graph=True, allow_unused=True)
        return flat([torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]).to(v.dtype)

    return apply


def rademacher(dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Independent ±1 entries, float64 (drawn on the CPU generator, then moved)."""
    v = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64) * 2 - 1
    return v.to(device)


@dataclass
class Tridiagonal:
    """Lanczos' T: diagonal ``alpha`` (m), off-diagonal ``beta`` (m − 1)."""
    alpha: torch.Tensor
    beta: torch.Tensor

    def eig(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ritz values (ascending) and T's eigenvectors (columns), float64 on the CPU."""
        m = len(self.alpha)
        T = torch.diag(self.alpha.cpu())
        if m > 1:
            b = self.beta.cpu()
            T += torch.diag(b, 1) + torch.diag(b, -1)
        return torch.linalg.eigh(T)


def lanczos(matvec: MatVec, v0: torch.Tensor, steps: int, tol: float = 1e-10) -> Tridiagonal:
    """``steps`` Lanczos steps from ``v0`` (float64), each new vector reorthogonalized against
    all earlier ones (twice: one Gram–Schmidt pass is not enough in floating point). Stops
    early when the Krylov space is invariant (β below ``tol``·‖H‖'s running estimate): T's
    eigenvalues are then exact eigenvalues of H."""
    steps = min(steps, v0.numel())
    Q = torch.empty(steps, v0.numel(), dtype=torch.float64, device=v0.device)
    Q[0] = v0 / v0.norm()
    alpha: List[float] = []
    beta: List[float] = []
    scale = 0.0
    for j in range(steps):
        w = matvec(Q[j])
        a = float(torch.dot(w, Q[j]))
        alpha.append(a)
        if j == steps - 1:
            break
        basis = Q[:j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        scale = max(scale, abs(a), b)
        if b <= tol * max(scale, 1e-30):
            break
        beta.append(b)
        Q[j + 1] = w / b
    return Tridiagonal(torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64))


def top_eigenvalues(T: Tridiagonal, k: int) -> List[float]:
    """The k largest Ritz values of a Lanczos run, largest first (fewer if it found an invariant
    space of dimension < k). Each is a lower bound of the eigenvalue of the same rank."""
    return T.eig()[0].flip(0)[:k].tolist()


def power_iteration(matvec: MatVec, dim: int, k: int, generator: torch.Generator, iters: int = 100,
                    tol: float = 1e-4, device: torch.device = torch.device("cpu")) -> List[float]:
    """The k eigenvalues of largest magnitude, largest first, by power iteration with deflation
    (Golub & Van Loan 2013, §7.3; the method of PyHessian, Yao et al. 2020).

    Each eigenvector found is projected out of the iterate before and after every product, so
    the next iteration runs on H restricted to the orthogonal complement; the estimate is the
    Rayleigh quotient vᵀHv, stopped when it changes by less than ``tol`` relative or after
    ``iters`` products. Converges at the rate |λ_{i+1}/λ_i|: slower than Lanczos, with the same
    number of products, when the top of the spectrum is crowded. At a minimum H ⪰ 0 nearly,
    so largest magnitude is largest value; a negative eigenvalue larger in magnitude than the
    top positive one would come first (with its sign)."""
    found: List[torch.Tensor] = []
    values: List[float] = []

    def deflate(v: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # twice: one Gram–Schmidt pass is not enough in floating point
            for q in found:
                v = v - torch.dot(q, v) * q
        return v

    for _ in range(min(k, dim)):
        v = deflate(rademacher(dim, generator, device))
        v = v / v.norm()
        value = 0.0
        for t in range(iters):
            w = deflate(matvec(v))
            new = float(torch.dot(v, w))
            norm = float(w.norm())
            converged = t > 0 and abs(new - value) <= tol * max(abs(value), 1e-30)
            value = new
            if norm == 0.0 or converged:  # H is zero on the complement, or the quotient settled
                break
            v = w / norm
        values.append(value)
        found.append(v)
    return values


def hutchinson_trace(matvec: MatVec, dim: int, samples: int, generator: torch.Generator,
                     device: torch.device = torch.device("cpu")) -> Tuple[float, float]:
    """tr H ≈ mean of vᵀHv over ``samples`` Rademacher v; returns (estimate, standard error).
    Exact for a diagonal H (vᵢ² = 1), with variance 2 Σ_{i≠j} H_ij² per sample otherwise."""
    values = []
    for _ in range(samples):
        v = rademacher(dim, generator, device)
        values.append(float(torch.dot(v, matvec(v))))
    x = torch.tensor(values, dtype=torch.float64)
    err = float(x.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else float("nan")
    return float(x.mean()), err


@dataclass
class Quadrature:
    """SLQ nodes and weights: one row per run; each run's weights sum to 1. ``runs`` keeps each
    run's tridiagonal matrix (its Ritz values are also the top-eigenvalue estimates)."""
    nodes: torch.Tensor
    weights: torch.Tensor
    runs: List[Tridiagonal]

    def moment(self, power: int) -> float:
        """∫ λ^power ρ(λ) dλ of the unsmoothed density = mean over runs of vᵀH^power v."""
        return float((self.weights * self.nodes ** power).sum(1).mean())

    def density(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """ρ(t) = (1/runs) Σ_runs Σᵢ τᵢ N(t; θᵢ, σ²) on ``grid``, float64."""
        t = grid.to(torch.float64)[:, None, None]
        g = torch.exp(-0.5 * ((t - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (g * self.weights).sum(2).mean(1)


def slq(matvec: MatVec, dim: int, runs: int, steps: int, generator: torch.Generator,
        device: torch.device = torch.device("cpu")) -> Quadrature:
    """``runs`` Lanczos quadratures from random Rademacher starts (normalized to unit length).
    A run that stops early (an invariant space) pads its nodes with weight 0."""
    steps = min(steps, dim)
    nodes = torch.zeros(runs, steps, dtype=torch.float64)
    weights = torch.zeros(runs, steps, dtype=torch.float64)
    tridiagonals = []
    for r in range(runs):
        tridiagonals.append(lanczos(matvec, rademacher(dim, generator, device), steps))
        theta, vecs = tridiagonals[-1].eig()
        m = len(theta)
        nodes[r, :m], weights[r, :m] = theta, vecs[0] ** 2
        nodes[r, m:] = theta[-1]
    return Quadrature(nodes, weights, tridiagonals)


def density_grid(q: Quadrature, sigma: float, points: int = 1000, pad: float = 5.0,
                 span: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """A grid covering every node ± ``pad``·σ (the smoothed density's mass lies there)."""
    lo, hi = span if span is not None else (float(q.nodes.min()), float(q.nodes.max()))
    return torch.linspace(lo - pad * sigma, hi + pad * sigma, points, dtype=torch.float64)


# ---------------------------------------------------------------- the probe
def loss_hvp(inputs: ProbeInputs) -> MatVec:
    """v ↦ Hv for the probe batch's loss. Attention runs in plain ops here: torch's fused
    attention kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        return hvp_operator(inputs.loss(), inputs.params)


def density_figure(q: Quadrature, sigma: float, title: str):
    """The smoothed eigenvalue density on a log scale (as Yao et al. 2020, Fig. 1, draw it:
    the bulk near 0 and the few outliers are both visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    grid = density_grid(q, sigma, points=600)
    rho = q.density(grid, sigma).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
    ax.semilogy(grid.numpy(), rho.numpy())
    ax.set_ylim(bottom=max(float(rho.min()), 1e-8))
    ax.set_xlabel("eigenvalue λ of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title, fontsize=9)
    # fixed margins, no minor log ticks, plain-text decade labels: tight_layout's measuring and
    # mathtext labels would cost more than all the Hessian-vector products of the probe
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"1e{math.log10(v):.0f}"))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.9)
    return fig


@register
class HessianProbe(Probe):
    name = "hessian"

    @dataclass
    class Config:
        top_k: int = 3  # largest eigenvalues reported (the first Lanczos run's Ritz values)
        lanczos_steps: int = 30  # Krylov dimension of each run (quadrature nodes per run)
        slq_runs: int = 1  # random starts of the density
        trace_samples: int = 10  # Hutchinson's Rademacher vectors
        density_sigma: float = 0.01  # Gaussian width, as a fraction of the nodes' range
        top_method: str = "lanczos"  # lanczos (free from the density's run) | power (deflation)
        power_iters: int = 100  # top_method=power: products per eigenvalue at most
        power_tol: float = 1e-4  # top_method=power: relative change of vᵀHv that stops it

    ranges = {k: (lambda v: v >= 1, "an integer >= 1")
              for k in ("top_k", "lanczos_steps", "trace_samples", "slq_runs")}
    ranges["density_sigma"] = (lambda v: v > 0, "a number > 0")
    ranges["top_method"] = (lambda v: v in ("lanczos", "power"), "lanczos or power")
    ranges["power_iters"] = (lambda v: v >= 1, "an integer >= 1")
    ranges["power_tol"] = (lambda v: v > 0, "a number > 0")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.last = None

    def measure(self, inputs: ProbeInputs, generator: torch.Generator) -> Dict[str, float]:
        c = self.cfg
        matvec = loss_hvp(inputs)
        dim, device = sum(p.numel() for p in inputs.params), inputs.x.device
        q = slq(matvec, dim, c.slq_runs, max(c.lanczos_steps, c.top_k), generator, device)
        top = (top_eigenvalues(q.runs[0], c.top_k) if c.top_method == "lanczos" else
               power_iteration(matvec, dim, c.top_k, generator, c.power_iters, c.power_tol, device))
        trace, err = hutchinson_trace(matvec, dim, c.trace_samples, generator, device)
        self.last = q
        out = {f"hessian/top{i + 1}": v for i, v in enumerate(top)}
        out.update({"hessian/trace": trace, "hessian/trace_stderr": err,
                    "hessian/density_min": float(q.nodes.min()), "hessian/density_max": float(q.nodes.max())})
        return out

    def figures(self, epoch: int) -> Dict[str, Any]:
        if self.last is None:
            return {}
        q = self.last
        span = float(q.nodes.max() - q.nodes.min())
        sigma = self.cfg.density_sigma * (span if span > 0 else 1.0)
        title = (f"Hessian eigenvalue density at epoch {epoch} (SLQ: {self.cfg.slq_runs} run(s) × "
                 f"{q.nodes.shape[1]} Lanczos steps, σ = {sigma:.3g})")
        return {"hessian_density": density_figure(q, sigma, title)}
