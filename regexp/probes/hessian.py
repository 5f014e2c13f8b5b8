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

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from regexp.probes.base import MemberAxis, Probe, ProbeInputs, register

MatVec = Callable[[torch.Tensor], torch.Tensor]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def hvp_operator(loss: torch.Tensor, params: Sequence[torch.Tensor], members: int = 1,
                 mask: Optional[torch.Tensor] = None) -> MatVec:
    """v ↦ Hv for the Hessian of ``loss`` w.r.t. ``params``, v a flat float64 vector (P,), or
    (M, P) rows for M members (``params`` stacked along a leading member dimension, ``loss``
    their (M,) losses).

    Members are independent, so the Hessian of the summed loss is block diagonal: one double
    backward gives every member's own product. ``mask`` (M, P) keeps each member's real
    entries: padded units are projected out of v and of Hv (the padded network's Hessian
    restricted to the real entries is the member's own; its padded block is not, e.g. tanh
    couples a padded unit's incoming and outgoing weights). The gradient's graph is built
    once (``create_graph``) and kept, so each product is one backward pass through it.
    """
    params = list(params)
    grads = torch.autograd.grad(loss.sum(), params, create_graph=True, allow_unused=True)
    # one (M, P) tensor with the graph: each product is then a single backward from it
    g = torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(members, -1) for p, gr in zip(params, grads)], 1)
    dtype = params[0].dtype
    keep = mask.to(torch.float64) if mask is not None else None

    def apply(v: torch.Tensor) -> torch.Tensor:
        if not g.requires_grad:  # the loss is linear in the parameters: H = 0
            return torch.zeros_like(v)
        rows = v.reshape(members, -1)
        if keep is not None:
            rows = rows * keep
        hv = torch.autograd.grad(g, params, grad_outputs=rows.to(dtype), retain_graph=True, allow_unused=True)
        out = torch.cat([(torch.zeros_like(p) if h is None else h).reshape(members, -1)
                         for p, h in zip(params, hv)], 1).to(v.dtype)
        if keep is not None:
            out = out * keep
        return out.reshape(v.shape)

    return apply


def rademacher(dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Independent ±1 entries, float64 (drawn on the CPU generator, then moved)."""
    v = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64) * 2 - 1
    return v.to(device)


def _space(space: Union[int, torch.Tensor, MemberAxis], generators,
           device) -> Tuple[MemberAxis, List[torch.Generator], bool]:
    """A member mask (M, P) or a probe's :class:`MemberAxis` (whose draws follow a lone ensemble's
    order) with one generator per member, or a plain dimension and one generator."""
    if isinstance(space, MemberAxis):
        return space, list(generators), False
    if isinstance(space, int):
        return MemberAxis([torch.empty(space, device=device)]), [generators], True
    axis = MemberAxis([torch.empty(space.shape, device=space.device)], space.shape[0], [space])
    return axis, list(generators), False


def _rademacher_rows(axis: MemberAxis, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return axis.rows(lambda n, g: rademacher(n, g, torch.device("cpu")), generators)


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
        if not bool(torch.isfinite(T).all()):  # a diverged member's weights: nothing to decompose
            return torch.full((m,), float("nan"), dtype=torch.float64), torch.full((m, m), float("nan"), dtype=torch.float64)
        return torch.linalg.eigh(T)


def lanczos(matvec: MatVec, v0: torch.Tensor, steps: int, tol: float = 1e-10,
            dims: Optional[Sequence[int]] = None, basis_out: Optional[List[torch.Tensor]] = None
            ) -> Union[Tridiagonal, List[Tridiagonal]]:
    """``steps`` Lanczos steps from ``v0`` (float64) with full reorthogonalization: each new
    vector w = Hqⱼ − αⱼqⱼ − βⱼ₋₁qⱼ₋₁ (the three-term recurrence) then takes one classical
    Gram–Schmidt pass against all earlier q (Golub & Van Loan 2013, §10.3). The recurrence is
    the first of the two passes that floating point needs (Kahan's "twice is enough", Parlett
    1998), so the basis is swept once per step: that sweep costs a third to half as much as the
    Hessian-vector product itself at the default 30 steps of a 15k-parameter MLP. Stops early
    when the Krylov space is invariant (β below ``tol``·‖H‖'s running estimate): T's
    eigenvalues are then exact eigenvalues of H.

    ``v0`` of shape (M, P) runs M members' iterations together (one batched product per step;
    dot products and norms per row), each at most ``dims[m]`` steps (its real dimension) and
    stopping on its own; a stopped member's row stays zero. Returns one T per row; ``basis_out``, a
    list, receives the orthonormal Krylov basis Q (M, steps, P), rows past a member's last step zero."""
    single = v0.dim() == 1
    V = v0.reshape(1, -1) if single else v0
    M, P = V.shape
    caps = [min(steps, d) for d in (dims if dims is not None else [P] * M)]
    Q = torch.zeros(M, max(caps), P, dtype=torch.float64, device=V.device)  # each member's basis, row by row
    Q[:, 0] = V / V.norm(dim=1, keepdim=True)
    alpha: List[List[float]] = [[] for _ in range(M)]
    beta: List[List[float]] = [[] for _ in range(M)]
    scale = [0.0] * M
    live = [c > 0 for c in caps]
    prev = torch.zeros(M, 1, dtype=torch.float64, device=V.device)  # βⱼ₋₁ of the live rows, 0 elsewhere
    for j in range(max(caps)):
        q = Q[:, j]
        w = matvec(q.reshape(-1) if single else q).reshape(M, P)
        a = (w * q).sum(1, keepdim=True)
        for m, am in enumerate(a.view(-1).tolist()):
            if live[m]:
                alpha[m].append(am)
                live[m] = j < caps[m] - 1
        if not any(live):
            break
        w = w - a * q
        if j > 0:
            w = w - prev * Q[:, j - 1]
        basis = Q[:, :j + 1]  # (M, j + 1, P)
        w = torch.baddbmm(w.unsqueeze(1), torch.bmm(basis, w.unsqueeze(2)).transpose(1, 2), basis, alpha=-1).squeeze(1)
        b = w.norm(dim=1)
        prev.zero_()
        for m, bm in enumerate(b.tolist()):
            if not live[m]:
                continue
            scale[m] = max(scale[m], abs(alpha[m][-1]), bm)
            if bm <= tol * max(scale[m], 1e-30):
                live[m] = False
                continue
            beta[m].append(bm)
            prev[m] = bm
            Q[m, j + 1] = w[m] / bm
    out = [Tridiagonal(torch.tensor(al, dtype=torch.float64), torch.tensor(be, dtype=torch.float64))
           for al, be in zip(alpha, beta)]
    if basis_out is not None:
        for m, al in enumerate(alpha):  # a member stopped at an invariant space: its next q was never set
            Q[m, len(al):] = 0
        basis_out.append(Q)
    return out[0] if single else out


def top_eigenvalues(T: Tridiagonal, k: int) -> List[float]:
    """The k largest Ritz values of a Lanczos run, largest first (fewer if it found an invariant
    space of dimension < k). Each is a lower bound of the eigenvalue of the same rank."""
    return T.eig()[0].flip(0)[:k].tolist()


def power_iteration(matvec: MatVec, space: Union[int, torch.Tensor, MemberAxis], k: int, generator, iters: int = 100,
                    tol: float = 1e-4, device: torch.device = torch.device("cpu")):
    """The k eigenvalues of largest magnitude, largest first, by power iteration with deflation
    (Golub & Van Loan 2013, §7.3; the method of PyHessian, Yao et al. 2020).

    Each eigenvector found is projected out of the iterate before and after every product, so
    the next iteration runs on H restricted to the orthogonal complement; the estimate is the
    Rayleigh quotient vᵀHv, stopped when it changes by less than ``tol`` relative or after
    ``iters`` products. Converges at the rate |λ_{i+1}/λ_i|: slower than Lanczos, with the same
    number of products, when the top of the spectrum is crowded. At a minimum H ⪰ 0 nearly,
    so largest magnitude is largest value; a negative eigenvalue larger in magnitude than the
    top positive one would come first (with its sign).

    ``space`` is the dimension P (one ``generator``) or a member mask (M, P) with M generators:
    the members iterate together (one batched product per step), each stopping on its own and
    finding at most as many eigenvalues as it has real entries; then one list per member."""
    axis, gens, single = _space(space, generator, device)
    M, dims = axis.members, axis.dims
    found: List[torch.Tensor] = []  # (M, P) each: every member's i-th eigenvector
    values: List[List[float]] = [[] for _ in range(M)]

    def deflate(v: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # twice: one Gram–Schmidt pass is not enough in floating point
            for q in found:
                v = v - (q * v).sum(1, keepdim=True) * q
        return v

    for i in range(min(k, max(dims))):
        live = torch.tensor([i < d for d in dims])
        v = deflate(_rademacher_rows(axis, gens).to(device))
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        value = torch.zeros(M, dtype=torch.float64)
        active = live.clone()
        for t in range(iters):
            w = deflate(matvec(v.reshape(-1) if single else v).reshape(M, -1))
            new = (v * w).sum(1).cpu()
            norm = w.norm(dim=1)
            converged = (new - value).abs() <= tol * value.abs().clamp_min(1e-30) if t > 0 else torch.zeros(M, dtype=torch.bool)
            value = torch.where(active, new, value)
            # H zero on the complement, or the quotient settled: that member keeps its v
            active = active & ~((norm.cpu() == 0) | converged)
            if not bool(active.any()):
                break
            v = torch.where(active.to(v.device).unsqueeze(1), w / norm.clamp_min(1e-300).unsqueeze(1), v)
        for m in range(M):
            if live[m]:
                values[m].append(float(value[m]))
        found.append(v * live.to(v.device, torch.float64).unsqueeze(1))
    return values[0] if single else values


def hutchinson_trace(matvec: MatVec, space: Union[int, torch.Tensor, MemberAxis], samples: int, generator,
                     device: torch.device = torch.device("cpu"), basis: Optional[torch.Tensor] = None,
                     basis_trace: Optional[Sequence[float]] = None):
    """tr H ≈ mean of vᵀHv over ``samples`` Rademacher v; returns (estimate, standard error).
    Exact for a diagonal H (vᵢ² = 1), with variance 2 Σ_{i≠j} H_ij² per sample otherwise.

    ``space`` is the dimension P (one model, one ``generator``) or a member mask (M, P) with a
    list of M generators: then one (estimate, error) per member, each v drawn on the member's
    real entries from its own generator.

    With an orthonormal ``basis`` Q ((M, k, P), or (k, P) for one model) and its ``basis_trace``
    tr(QᵀHQ) (one per member), the estimate is deflated (Meyer, Musco, Musco & Woodruff 2021,
    Hutch++): tr H = tr(QᵀHQ) + tr((I − QQᵀ) H (I − QQᵀ)), the first term known and Hutchinson's
    samples spent on the second only, u = (I − QQᵀ)v, uᵀHu. Still unbiased for any Q independent
    of the v; its variance drops from about 2‖H‖²_F to 2‖(I − QQᵀ) H (I − QQᵀ)‖²_F, which is
    much smaller when Q spans the few large outlying eigenvalues that dominate a trained
    network's Hessian (the Lanczos basis the density already built does)."""
    axis, gens, single = _space(space, generator, device)
    Q = None if basis is None else (basis.unsqueeze(0) if single else basis).to(device)
    values = []
    for _ in range(samples):
        v = _rademacher_rows(axis, gens).to(device)
        if Q is not None:
            v = v - torch.bmm(torch.bmm(Q, v.unsqueeze(2)).transpose(1, 2), Q).squeeze(1)
        hv = matvec(v.view(-1) if single else v).reshape(v.shape)
        values.append((v * hv).sum(1))
    x = torch.stack(values).cpu()  # (samples, M)
    if basis_trace is not None:
        x = x + torch.tensor(list(basis_trace), dtype=x.dtype)
    err = (x.std(0, unbiased=True) / math.sqrt(samples)).tolist() if samples > 1 else [float("nan")] * len(gens)
    out = list(zip(x.mean(0).tolist(), err))
    return out[0] if single else out


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
        z = ((t - self.nodes) / sigma) ** 2
        # exp of an argument below about -708 underflows through denormals, which x86 computes
        # tens of times slower (most of the grid, far from every node): such terms are < 1e-304
        # of the peak, so they are set to 0 and exp only sees normal results
        far = z > 1400
        g = torch.exp(-0.5 * z.masked_fill(far, 0)).masked_fill(far, 0) / (sigma * math.sqrt(2 * math.pi))
        return (g * self.weights).sum(2).mean(1)


def slq(matvec: MatVec, space: Union[int, torch.Tensor, MemberAxis], runs: int, steps: int, generator,
        device: torch.device = torch.device("cpu"), basis: Optional[List[torch.Tensor]] = None):
    """``runs`` Lanczos quadratures from random Rademacher starts (normalized to unit length).
    A run that stops early (an invariant space) pads its nodes with weight 0. ``space`` as in
    :func:`hutchinson_trace`: a member mask gives one quadrature per member. ``basis``, a list,
    receives the first run's Krylov basis (see :func:`lanczos`)."""
    axis, gens, single = _space(space, generator, device)
    M = len(gens)
    caps = [min(steps, d) for d in axis.dims]
    nodes = [torch.zeros(runs, c, dtype=torch.float64) for c in caps]
    weights = [torch.zeros(runs, c, dtype=torch.float64) for c in caps]
    tridiagonals: List[List[Tridiagonal]] = [[] for _ in range(M)]
    for r in range(runs):
        v = _rademacher_rows(axis, gens)
        for m, T in enumerate(lanczos(matvec, v, steps, dims=axis.dims, basis_out=basis if r == 0 else None)):
            tridiagonals[m].append(T)
            theta, vecs = T.eig()
            k = len(theta)
            nodes[m][r, :k], weights[m][r, :k] = theta, vecs[0] ** 2
            nodes[m][r, k:] = theta[-1]
    out = [Quadrature(n, w, t) for n, w, t in zip(nodes, weights, tridiagonals)]
    return out[0] if single else out


def density_grid(q: Quadrature, sigma: float, points: int = 1000, pad: float = 5.0,
                 span: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """A grid covering every node ± ``pad``·σ (the smoothed density's mass lies there)."""
    lo, hi = span if span is not None else (float(q.nodes.min()), float(q.nodes.max()))
    return torch.linspace(lo - pad * sigma, hi + pad * sigma, points, dtype=torch.float64)


# ---------------------------------------------------------------- the probe
def loss_hvp(inputs: ProbeInputs) -> MatVec:
    """v ↦ Hv for the probe batch's loss, every member's at once. Attention runs in plain ops
    here: torch's fused attention kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ax = inputs.axis
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        return hvp_operator(inputs.loss(), inputs.params, ax.members, ax.mask if ax.padded else None)


class DensityPlot:
    """The smoothed eigenvalue density on a log scale, relative to its peak (as Yao et al. 2020,
    Fig. 1, draw it: the bulk near 0 and the few outliers are both visible), rendered to an RGB
    image by one Agg figure per process.

    Drawing is most of a probe's cost in a population, where every member gets its own figure
    (matplotlib renders and lays out text glyph by glyph). So what every density shares is
    rendered once: the frame, the y axis (the density divided by its peak, so always 1e-8 … 1
    on fixed decades) and both axis labels. Each density then restores that background and
    draws only its curve, its x ticks and its title on top (matplotlib's blitting), about a
    fifth of the cost of a whole figure."""

    FLOOR = 1e-8  # the lowest relative density shown: eight decades below the peak

    def __init__(self):
        import matplotlib.ticker as ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(6, 3.5), dpi=80)
        self.canvas = FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_axes((0.12, 0.14, 0.85, 0.76))
        (self.line,) = self.ax.semilogy([1.0, 2.0], [1.0, 1.0])
        self.ax.set_ylim(self.FLOOR, 3.0)
        self.ax.set_ylabel("density ÷ its peak (log scale)")
        self.ax.yaxis.set_label_coords(-0.1, 0.5)
        # a figure text, not the x axis' label: it is then part of the shared background
        self.figure.text(0.545, 0.015, "Hessian eigenvalue λ", ha="center", va="bottom")
        self.ax.xaxis.set_major_locator(ticker.MaxNLocator(6))
        self.ax.yaxis.set_major_locator(ticker.LogLocator(numticks=6))
        self.ax.yaxis.set_minor_locator(ticker.NullLocator())
        # plain-text decade labels: mathtext would cost more than the whole curve
        self.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"1e{math.log10(v):.0f}"))
        self.title = self.ax.set_title("", fontsize=9, y=1.02)  # a fixed y: matplotlib then places it without measuring
        # The x ticks as plain artists: matplotlib's Axis rebuilds Tick objects and measures
        # their labels on every draw, over half the cost of a redraw. The positions come from
        # the same MaxNLocator; marks and labels are drawn as a tick would draw them.
        self.locator = ticker.MaxNLocator(6)
        self.ax.xaxis.set_visible(False)
        along = self.ax.get_xaxis_transform()  # x in data, y in axes coordinates
        (self.marks,) = self.ax.plot([], [], ls="none", marker=3, color="black", markersize=3.5,
                                     markeredgewidth=0.8, transform=along, clip_on=False)
        self.labels = [self.ax.text(0, -0.025, "", transform=along, ha="center", va="top") for _ in range(12)]
        self.dynamic = [self.line, self.marks, self.title, *self.labels]
        for a in self.dynamic:
            a.set_visible(False)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)
        for a in self.dynamic:
            a.set_visible(True)

    def draw(self, q: Quadrature, sigma: float, title: str):
        """The RGB image (H, W, 3, uint8) of ``q``'s density smoothed by σ."""
        import numpy as np

        grid = density_grid(q, sigma, points=600)
        rho = q.density(grid, sigma)
        rho = (rho / rho.max().clamp_min(1e-300)).clamp_min(self.FLOOR / 10)
        self.line.set_data(grid.numpy(), rho.numpy())
        lo, hi = float(grid[0]), float(grid[-1])
        pad = 0.05 * (hi - lo) if hi > lo else 1.0  # matplotlib's default margins
        lo, hi = lo - pad, hi + pad
        self.ax.set_xlim(lo, hi)
        ticks = [t for t in self.locator.tick_values(lo, hi) if lo <= t <= hi][:len(self.labels)]
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        self.marks.set_data(ticks, [0.0] * len(ticks))
        for i, label in enumerate(self.labels):
            label.set_visible(i < len(ticks))
            if i < len(ticks):
                label.set_x(ticks[i])
                label.set_text(tick_label(ticks[i], step))
        self.title.set_text(title)
        self.canvas.restore_region(self.background)
        for a in self.dynamic:
            if a.get_visible():
                self.ax.draw_artist(a)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def tick_label(value: float, step: float) -> str:
    """A tick's label: the value rounded to the tick spacing, so that the locator's sums
    (0.30000000000000004, or 1e-16 for 0) print as 0.3 and 0."""
    v = round(value / step) * step
    return f"{0.0 if abs(v) < 1e-9 * step else v:.6g}"


@functools.lru_cache(maxsize=None)
def density_plot() -> DensityPlot:
    """The process's density figure, shared by every run's figures (they are drawn one at a time)."""
    return DensityPlot()


@register
class HessianProbe(Probe):
    name = "hessian"

    @dataclass
    class Config:
        top_k: int = 3  # largest eigenvalues reported (the first Lanczos run's Ritz values)
        # Krylov dimension of each run (quadrature nodes per run): on the default run 20 steps
        # find the top 3 eigenvalues within 0.2% (a tenth of their seed-to-seed spread; README, Probes)
        lanczos_steps: int = 20
        slq_runs: int = 1  # random starts of the density
        # Hutchinson's Rademacher vectors, spent on the part of H the density's Lanczos basis
        # leaves out (deflate_trace): on the default run 3 of them err two thirds as much as 10
        # plain ones did (README, Probes)
        trace_samples: int = 3
        deflate_trace: bool = True  # tr(QᵀHQ) of the Lanczos basis Q exactly, Hutchinson on the rest
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

    def measure(self, inputs: ProbeInputs, generators: Sequence[torch.Generator]) -> List[Dict[str, float]]:
        c = self.cfg
        matvec = loss_hvp(inputs)
        space, device = inputs.axis, inputs.x.device
        basis: List[torch.Tensor] = []
        qs = slq(matvec, space, c.slq_runs, max(c.lanczos_steps, c.top_k), generators, device, basis)
        tops = ([top_eigenvalues(q.runs[0], c.top_k) for q in qs] if c.top_method == "lanczos" else
                power_iteration(matvec, space, c.top_k, generators, c.power_iters, c.power_tol, device))
        # α_j = q_jᵀHq_j, so tr(QᵀHQ) is the first run's diagonal, computed already
        known = ([float(q.runs[0].alpha.sum()) for q in qs], basis[0]) if c.deflate_trace else (None, None)
        traces = hutchinson_trace(matvec, space, c.trace_samples, generators, device, known[1], known[0])
        self.last = qs
        out = []
        for q, top, (trace, err) in zip(qs, tops, traces):
            row = {f"hessian/top{i + 1}": v for i, v in enumerate(top)}
            row.update({"hessian/trace": trace, "hessian/trace_stderr": err,
                        "hessian/density_min": float(q.nodes.min()), "hessian/density_max": float(q.nodes.max())})
            out.append(row)
        return out

    def figures(self, epoch: int, member: int = 0) -> Dict[str, Any]:
        """The density as an RGB image (see :class:`DensityPlot`)."""
        if self.last is None:
            return {}
        q = self.last[member]
        span = float(q.nodes.max() - q.nodes.min())
        sigma = self.cfg.density_sigma * (span if span > 0 else 1.0)
        # short: every glyph of a title is rendered one by one (the run's config has the SLQ settings)
        title = f"SLQ, epoch {epoch}, σ = {sigma:.2g}"
        return {"hessian_density": density_plot().draw(q, sigma, title)}
