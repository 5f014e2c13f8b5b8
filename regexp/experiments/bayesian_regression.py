"""``+experiment=bayesian_regression``: Bayesian linear regression with an exact posterior on fixed
nonlinear features of ``function_fits``' 1-D toy data (Prince §9.3.5 and fig. 9.11; Bishop §3.3).

The model is f(x) = φ(x)ᵀw with fixed features φ (Gaussian bumps, or the hinges ReLU(x − cⱼ) of a
shallow network whose first layer is frozen, Prince ch. 3), Gaussian noise of known variance σ²
and the prior w ~ 𝒩(0, σ_p² I). The posterior is Gaussian and exact::

    Σ = (ΦᵀΦ/σ² + I/σ_p²)⁻¹,   μ = Σ Φᵀy / σ²,
    p(y*|x*) = 𝒩(φ(x*)ᵀμ, σ² + φ(x*)ᵀΣφ(x*)).

For every prior variance in ``extra.prior_variances`` the figure shows the posterior mean,
``extra.samples`` functions drawn from the posterior and the 2σ predictive band, beside the MAP
fit: the weights minimising Σᵢ(yᵢ − φ(xᵢ)ᵀw)² + λ‖w‖² with λ = σ²/σ_p² (the penalty-as-prior
reading of Prince §9.1.1), found by L-BFGS on that loss, not by the closed form, so that
``summary.csv`` can show max |w_MAP − μ| ≈ 0 as a measurement. The log evidence ln p(y) =
ln 𝒩(y | 0, σ_p²ΦΦᵀ + σ²I) (Bishop §3.5) says which prior the data prefer. The last two panels
are the bagging and MC-dropout bands (mean ± 2 std) that ``function_fits`` draws, from its own
code and the same points.

Writes ``posterior.png``, ``curves.csv`` (grid, truth, and per method its mean, the band's std
and, for the posteriors, the MAP fit and the samples), ``summary.csv`` (per method: λ, log
evidence, MAP against posterior mean, MSE to the true function, validation points inside the
band, mean validation negative log predictive density) and ``points.csv``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from omegaconf import DictConfig

from regexp.experiments import function_fits as ff
from regexp.experiments._figures import Outputs, subplots
from regexp.experiments._settings import require, require_choices, settings
from regexp.tasks import register_task
from regexp.train.threads import set_threads

FEATURES = ("rbf", "relu")


@dataclass
class Settings:
    n_points: int = 12  # as function_fits: the same points for the same seed
    n_val: int = 12
    noise: float = 0.2  # σ of the data, which the posterior also assumes
    features: str = "rbf"  # rbf: Gaussian bumps; relu: hinges of a shallow net with a frozen first layer
    n_features: int = 20  # bumps / hinges evenly over [0, 1]; a constant feature is added
    rbf_width: float = 0.08  # length scale ℓ of exp(−(x − c)²/ℓ²)
    prior_variances: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 100.0])
    samples: int = 5  # posterior functions drawn per panel
    grid: int = 200
    # the bands of function_fits, trained by its code (its defaults)
    steps: int = 3000
    dropout: float = 0.2
    ensemble: int = 10
    mc_samples: int = 100


def features(x: torch.Tensor, s: Settings) -> torch.Tensor:
    """Φ of shape (len(x), n_features + 1), float64; the last column is the constant 1."""
    x = x.reshape(-1, 1).double()
    c = torch.linspace(0, 1, s.n_features, dtype=torch.float64)
    if s.features == "rbf":
        phi = torch.exp(-((x - c) / s.rbf_width) ** 2)
    else:
        phi = torch.relu(x - c)
    return torch.cat([phi, torch.ones_like(x)], 1)


@dataclass
class Posterior:
    mean: torch.Tensor  # μ, (d,)
    cov: torch.Tensor  # Σ, (d, d)


def posterior(phi: torch.Tensor, y: torch.Tensor, noise_var: float, prior_var: float) -> Posterior:
    """The exact Gaussian posterior over w (Prince eq. 9.20 ff.; Bishop eq. 3.49–3.51)."""
    y = y.reshape(-1).to(phi.dtype)
    precision = phi.T @ phi / noise_var + torch.eye(phi.shape[1], dtype=phi.dtype) / prior_var
    chol = torch.linalg.cholesky(precision)
    cov = torch.cholesky_inverse(chol)
    mean = torch.cholesky_solve((phi.T @ y / noise_var).unsqueeze(1), chol).squeeze(1)
    return Posterior(mean, cov)


def predictive(post: Posterior, phi: torch.Tensor, noise_var: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean φᵀμ and variance σ² + φᵀΣφ of p(y*|x*) at every row of ``phi``."""
    return phi @ post.mean, noise_var + ((phi @ post.cov) * phi).sum(1)


def sample_functions(post: Posterior, phi: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` functions φᵀw with w ~ 𝒩(μ, Σ), shape (n, len(phi))."""
    # jitter: Σ of a strong prior is near-singular in float64 along directions the data pin down
    scale = torch.linalg.cholesky(post.cov + 1e-12 * torch.eye(len(post.mean), dtype=post.cov.dtype))
    z = torch.randn(n, len(post.mean), generator=generator, dtype=post.cov.dtype)
    return (post.mean + z @ scale.T) @ phi.T


def log_evidence(phi: torch.Tensor, y: torch.Tensor, noise_var: float, prior_var: float) -> float:
    """ln p(y) = ln 𝒩(y | 0, σ_p²ΦΦᵀ + σ²I): the marginal likelihood of the prior variance."""
    k = prior_var * phi @ phi.T + noise_var * torch.eye(len(phi), dtype=phi.dtype)
    dist = torch.distributions.MultivariateNormal(torch.zeros(len(phi), dtype=phi.dtype), covariance_matrix=k)
    return float(dist.log_prob(y.reshape(-1).to(phi.dtype)))


def map_fit(phi: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_w Σᵢ(yᵢ − φᵢᵀw)² + λ‖w‖², by L-BFGS from w = 0 (an optimiser, not the closed form)."""
    y = y.reshape(-1).to(phi.dtype)
    w = torch.zeros(phi.shape[1], dtype=phi.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=2000, history_size=50, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (y - phi @ w).pow(2).sum() + lam * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _check(s: Settings) -> None:
    require_choices("extra.features", [s.features], FEATURES)
    for key in ("n_points", "n_val", "n_features", "samples", "grid"):
        require(getattr(s, key) >= 1, f"extra.{key}", getattr(s, key), "an integer >= 1")
    require(s.noise > 0, "extra.noise", s.noise, "a number > 0 (the likelihood's σ)")
    require(s.rbf_width > 0, "extra.rbf_width", s.rbf_width, "a number > 0")
    require(len(s.prior_variances) >= 1 and all(v > 0 for v in s.prior_variances), "extra.prior_variances",
            s.prior_variances, "a non-empty list of numbers > 0")


def _gaussian_nlpd(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> float:
    return float((0.5 * torch.log(2 * math.pi * var) + (y - mean) ** 2 / (2 * var)).mean())


@register_task("bayesian_regression")
def bayesian_regression(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "bayesian_regression")
    _check(s)
    fs = ff.Settings(n_points=s.n_points, n_val=s.n_val, noise=s.noise, steps=s.steps, dropout=s.dropout,
                     ensemble=s.ensemble, mc_samples=s.mc_samples, grid=s.grid)
    ff._check(fs, cfg)
    set_threads(cfg.trainer.threads, torch.device("cpu"), lambda: 0.0)
    p = ff.make_problem(fs, cfg.seed)
    noise_var = s.noise ** 2
    phi, phi_grid, phi_val = features(p.x, s), features(p.grid, s), features(p.x_val, s)
    truth = ff.Problem.truth(p.grid).reshape(-1).double()
    y_val = p.y_val.reshape(-1).double()
    gen = torch.Generator().manual_seed(cfg.seed)

    panels: Dict[str, Dict[str, torch.Tensor]] = {}
    summary = []
    for prior_var in s.prior_variances:
        post = posterior(phi, p.y, noise_var, prior_var)
        lam = noise_var / prior_var
        w_map = map_fit(phi, p.y, lam)
        mean, var = predictive(post, phi_grid, noise_var)
        val_mean, val_var = predictive(post, phi_val, noise_var)
        name = f"posterior σ_p²={prior_var:g}"
        panels[name] = {"mean": mean, "std": var.sqrt(), "map": phi_grid @ w_map,
                        "epistemic std": (var - noise_var).clamp_min(0).sqrt(),
                        "samples": sample_functions(post, phi_grid, s.samples, gen)}
        inside = ((y_val - val_mean).abs() <= 2 * val_var.sqrt()).double().mean()
        summary.append({"method": name, "prior_variance": prior_var, "lambda": lam,
                        "log_evidence": log_evidence(phi, p.y, noise_var, prior_var),
                        "map_max_weight_diff": float((w_map - post.mean).abs().max()),
                        "map_max_curve_diff": float((phi_grid @ w_map - mean).abs().max()),
                        "truth_mse": float((mean - truth).pow(2).mean()),
                        "val_inside_2std": float(inside), "val_nlpd": _gaussian_nlpd(y_val, val_mean, val_var)})

    members = ff.bagged(cfg, p, fs)
    dropout_model = ff.fit(cfg, p, s.steps, cfg.seed, dropout=s.dropout)[0]
    bands = {f"bagging ({s.ensemble} models)": lambda x: torch.stack([ff.predict(m, x) for m in members]),
             f"MC dropout ({s.mc_samples} samples)": lambda x: ff.mc_dropout(dropout_model, x, s.mc_samples)}
    for name, predict in bands.items():
        grid, val = predict(p.grid).double(), predict(p.x_val).double()
        panels[name] = {"mean": grid.mean(0), "std": grid.std(0)}
        inside = ((y_val - val.mean(0)).abs() <= 2 * val.std(0)).double().mean()
        # the band is the spread of the fits alone: it has no noise term, unlike the posterior's
        summary.append({"method": name, "truth_mse": float((grid.mean(0) - truth).pow(2).mean()),
                        "val_inside_2std": float(inside),
                        "val_nlpd": _gaussian_nlpd(y_val, val.mean(0), val.var(0).clamp_min(1e-12))})

    fig = _figure(p, panels, truth, s)
    tables = {"curves": _curve_rows(p, truth, panels), "summary": summary, "points": p.rows()}
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.figure("posterior", fig)
        for name, rows in tables.items():
            out.table(name, rows)
    for r in summary:
        print(f"{r['method']:<28} " + "  ".join(f"{k} {r[k]:.3g}" for k in r if k != "method"))
    return {"status": "completed", "methods": len(summary)}


def _curve_rows(p: ff.Problem, truth: torch.Tensor, panels: Dict[str, Dict[str, torch.Tensor]]) -> List[Dict]:
    """One row per grid point: every method's mean and band std; the posteriors' MAP, epistemic
    std and samples."""
    rows = []
    for i, x in enumerate(p.grid[:, 0].tolist()):
        row = {"x": x, "truth": float(truth[i])}
        for name, c in panels.items():
            row.update({name if key == "mean" else f"{name} {key}": float(c[key][i])
                        for key in ("mean", "std", "map", "epistemic std") if key in c})
            row.update({f"{name} sample {j}": float(f[i]) for j, f in enumerate(c.get("samples", []))})
        rows.append(row)
    return rows


def _figure(p: ff.Problem, panels: Dict[str, Dict[str, torch.Tensor]], truth: torch.Tensor, s: Settings):
    fig, axes = subplots(len(panels), cols=3, size=3.4, sharex=True, sharey=True)
    x = p.grid.squeeze(1)
    for ax, (name, c) in zip(axes, panels.items()):
        ax.plot(x, truth, color="0.6", lw=1, label="sin(2πx)")
        bayes = "map" in c
        ax.fill_between(x, c["mean"] - 2 * c["std"], c["mean"] + 2 * c["std"], color="C1", alpha=0.25,
                        label="predictive ±2σ" if bayes else "mean ± 2 std")
        if bayes:
            for j, f in enumerate(c["samples"]):
                ax.plot(x, f, color="C2", lw=0.6, alpha=0.7, label="posterior samples" if j == 0 else None)
        ax.plot(x, c["mean"], color="C1", lw=1.8, label="posterior mean" if bayes else "mean")
        if bayes:
            ax.plot(x, c["map"], color="k", lw=1, ls="--", label="MAP, L2 λ=σ²/σ_p²")
        ax.plot(p.x, p.y, "o", color="C0", ms=4, label="training points")
        ax.set_ylim(-2.5, 2.5)
        ax.set_title(name, fontsize=9)
        if ax is axes[0] or (not bayes and "map" in panels[list(panels)[axes.index(ax) - 1]]):
            ax.legend(fontsize=6, loc="lower left")  # once for the posteriors, once for the bands
    fig.suptitle(f"Bayesian linear regression on {s.n_features} {s.features} features + bias, σ={s.noise:g}, "
                 f"{s.n_points} points; bagging and MC dropout as in function_fits")
    fig.tight_layout()
    return fig
