"""``+experiment=dropout_ensemble``: dropout as an ensemble of sub-networks (Goodfellow et al. §7.12).

1. **Enumeration.** An MLP of ``model.depth`` hidden layers of ``extra.enum_width`` units (2 × 7:
   2^14 = 16384 masks) is trained with dropout p on every hidden unit (``regularizer.dropout``),
   one run per seed. On the test set every mask μ ∈ {0,1}^d over the d hidden units, with
   p(μ) = (1−p)^|μ| p^(d−|μ|), gives the sub-network's p(y|x, μ) (kept units scaled by 1/(1−p),
   as in training). Compared:

   - the arithmetic mean Σ_μ p(μ) p(y|x, μ), the ensemble dropout trains;
   - the renormalised geometric mean p̃(y|x) ∝ exp Σ_μ p(μ) ln p(y|x, μ) (the weighted form of
     (∏_μ p(y|x, μ))^(1/2^d), which it is for p = ½);
   - weight scaling: one pass with every unit on (the trainer's evaluation);
   - Monte-Carlo averaging of T random masks, for each T in ``extra.mc_samples``.

   When the dropped units feed the softmax layer directly (one hidden layer, or a softmax
   regression with dropped inputs), weight scaling *is* the renormalised geometric mean, because
   Σ_μ p(μ) W(μ ⊙ h)/(1−p) = Wh; masks that pass through a further nonlinearity make it an
   approximation, and the table measures how close it comes.
2. **"Dropout needs larger models".** Test error against the hidden width, without and with
   dropout p, ``extra.seeds`` each, one sweep (``width_sweep/{none,dropout}/``).

Writes ``dropout_ensemble.png``, ``inference.csv`` (seed × rule: test error, NLL and the mean KL
from the arithmetic and from the geometric mean), ``width.csv`` (every sweep run) and ``width_summary.csv``.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._layers import initial_model
from regexp.experiments._runs import run_grid, select
from regexp.experiments._settings import require, settings
from regexp.models import sites
from regexp.models.sites import Site
from regexp.regularizers.dropout import Dropout
from regexp.sweep import point_config
from regexp.tasks import register_task
from regexp.train.io import load_tensors


@dataclass
class Settings:
    p: float = 0.5  # dropout probability of the hidden units
    enum_width: int = 7  # units per hidden layer of the enumerated net: 2^(depth × 7) sub-networks
    mc_samples: List[int] = field(default_factory=lambda: [1, 10, 100])
    widths: List[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


def all_masks(d: int) -> torch.Tensor:
    """Every mask in {0,1}^d, shape (2^d, d)."""
    bits = torch.arange(2 ** d).unsqueeze(1) >> torch.arange(d)
    return (bits & 1).double()


def masked_logits(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, keep: float) -> torch.Tensor:
    """The MLP's logits under each mask, shape (masks, n, classes); a mask holds one bit per hidden
    unit, layer after layer, and kept units are scaled by 1/keep (inverted dropout)."""
    h = x.flatten(1).to(masks.dtype).unsqueeze(0)
    col = 0
    for layer in model.hidden:
        if isinstance(layer, Site):
            width = h.shape[-1]
            h = h * masks[:, None, col:col + width] / keep
            col += width
        else:
            h = layer(h)
    return model.head(h)


@torch.no_grad()
def mask_ensemble(model: nn.Module, x: torch.Tensor, p: float, chunk: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic and renormalised geometric means, weighted by p(μ), over every dropout mask μ
    of the MLP's hidden units (float64)."""
    model = copy.deepcopy(model).double().eval()
    d, keep = sum(m.out_features for m in model.hidden if isinstance(m, nn.Linear)), 1.0 - p
    arith = log_geo = 0.0
    for m in all_masks(d).split(chunk):
        kept = m.sum(1)
        weight = keep ** kept * p ** (d - kept)  # p(μ)
        log_p = F.log_softmax(masked_logits(model, x, m, keep), -1)
        arith = arith + torch.einsum("m,mnc->nc", weight, log_p.exp())
        log_geo = log_geo + torch.einsum("m,mnc->nc", weight, log_p)
    return arith, F.softmax(log_geo, 1)


@torch.no_grad()
def mc_average(model: nn.Module, x: torch.Tensor, samples: int, generator_seed: int) -> torch.Tensor:
    """Mean probability over ``samples`` random masks (Site.mc), seeded for a repeatable table."""
    hidden = sites(model, "hidden")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for site in hidden:
            site.mc = True
        try:
            return sum(F.softmax(model(x), 1) for _ in range(samples)).double() / samples
        finally:
            for site in hidden:
                site.mc = False


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(p ‖ q) over the examples."""
    return float((p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(1).mean())


def _scores(probs: torch.Tensor, y: torch.Tensor, arith: torch.Tensor, geo: torch.Tensor) -> Dict[str, float]:
    return {"test_error": float((probs.argmax(1) != y).double().mean()),
            "test_nll": float(-probs.gather(1, y[:, None]).clamp_min(1e-300).log().mean()),
            "kl_from_arithmetic": _kl(arith, probs), "kl_from_geometric": _kl(geo, probs)}


def _dropout_config(cfg: DictConfig, p: float) -> DictConfig:
    v = copy.deepcopy(cfg)
    v.extra = {}  # the runs do not read extra, so relaunches reuse them
    v.regularizer = {"dropout": OmegaConf.structured(Dropout.Config(p=p))} if p > 0 else {}
    return v


def _check(s: Settings, cfg: DictConfig) -> None:
    require(cfg.model.name == "mlp", "model.name", cfg.model.name, "mlp (masks enumerated over its hidden units)")
    require(cfg.model.norm == "none", "model.norm", cfg.model.norm, "none (the masks are applied layer by layer)")
    require(cfg.model.depth >= 1, "model.depth", cfg.model.depth, "an integer >= 1 (hidden units to drop)")
    require(0 < s.p < 1, "extra.p", s.p, "a number in (0, 1)")
    units = cfg.model.depth * s.enum_width
    require(1 <= units <= 16, "extra.enum_width", s.enum_width,
            f"an integer with model.depth × enum_width <= 16 (2^units masks; depth is {cfg.model.depth})")
    require(all(t >= 1 for t in s.mc_samples), "extra.mc_samples", s.mc_samples, "integers >= 1")
    require(len(s.widths) >= 1 and all(w >= 1 for w in s.widths), "extra.widths", s.widths, "integers >= 1")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")


@register_task("dropout_ensemble")
def dropout_ensemble(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "dropout_ensemble")
    _check(s, cfg)
    data = load_data(cfg.data, cfg.seed)
    dcfg = _dropout_config(cfg, s.p)
    enum_rows = run_grid(dcfg, {"model.width": [s.enum_width]}, s.seeds, out_dir / "enumerated")
    inference = []
    for row in enum_rows:
        if row["status"] != "completed":
            continue
        mcfg = point_config(dcfg, {"model.width": s.enum_width}).model
        model = initial_model(mcfg, row["seed"], data.input_shape, data.num_classes)
        model.load_state_dict(load_tensors(Path(row["run_dir"]) / "model.pt", "model file",
                                           "delete the run folder and run again"))
        model.eval()
        for site in sites(model, "hidden"):
            site.p = s.p  # for the Monte-Carlo passes; weight scaling (eval) ignores it
        with torch.no_grad():
            scaled = F.softmax(model(data.x_test), 1).double()
        arith, geo = mask_ensemble(model, data.x_test, s.p)
        rules = {"arithmetic mean (all masks)": arith, "geometric mean (all masks)": geo, "weight scaling": scaled}
        rules.update({f"MC T={t}": mc_average(model, data.x_test, t, row["seed"]) for t in s.mc_samples})
        for rule, probs in rules.items():
            inference.append({"seed": row["seed"], "rule": rule, **_scores(probs, data.y_test, arith, geo)})
    widths = []
    for label, p in (("none", 0.0), ("dropout", s.p)):
        for r in run_grid(_dropout_config(cfg, p), {"model.width": s.widths}, s.seeds, out_dir / "width_sweep" / label):
            widths.append({"dropout": label, **r})
    width_summary = _width_summary(s, widths)
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.table("inference", inference)
        out.table("width", widths)
        out.table("width_summary", width_summary)
        out.figure("dropout_ensemble", _figure(s, cfg.model.depth, inference, width_summary))
    for r in _rule_means(inference):
        print(f"{r['rule']:<28} test error {r['test_error']:.4f}  NLL {r['test_nll']:.4f}  "
              f"KL from arithmetic {r['kl_from_arithmetic']:.2e}  from geometric {r['kl_from_geometric']:.2e}")
    for r in width_summary:
        print(f"width {r['width']:>4}  " + "  ".join(f"{k} {r[k]:.4f}" for k in r if k != "width"))
    failed = sum(r["status"] != "completed" for r in enum_rows + widths)
    return {"status": "completed" if not failed else "failed", "runs": len(enum_rows) + len(widths), "failed": failed}


def _rule_means(inference: List[Dict]) -> List[Dict]:
    rules = list(dict.fromkeys(r["rule"] for r in inference))
    return [{"rule": rule, **{k: statistics.fmean(r[k] for r in inference if r["rule"] == rule)
                              for k in ("test_error", "test_nll", "kl_from_arithmetic", "kl_from_geometric")}} for rule in rules]


def _width_summary(s: Settings, widths: List[Dict]) -> List[Dict]:
    out = []
    for w in s.widths:
        row: Dict = {"width": w}
        for label in ("none", "dropout"):
            errs = [float(r["test_error"]) for r in select(widths, **{"dropout": label, "model.width": w})
                    if r["status"] == "completed"]
            if errs:
                row[f"{label}_test_error"] = statistics.fmean(errs)
                row[f"{label}_test_error_std"] = statistics.stdev(errs) if len(errs) > 1 else 0.0
        out.append(row)
    return out


def _figure(s: Settings, depth: int, inference: List[Dict], width_summary: List[Dict]):
    fig, (ax_rule, ax_width) = plt.subplots(1, 2, figsize=(11, 4))
    means = _rule_means(inference)
    names = [r["rule"] for r in means]
    for j, seed in enumerate(s.seeds):
        nll = [next((r["test_nll"] for r in inference if r["rule"] == n and r["seed"] == seed), float("nan"))
               for n in names]
        ax_rule.plot(nll, range(len(names)), "o", color=f"C{j}", label=f"seed {seed}")
    ax_rule.set_yticks(range(len(names)), names, fontsize=8)
    ax_rule.set_xlabel("test NLL")
    ax_rule.set_title(f"{depth} hidden layer(s) of {s.enum_width} units, p={s.p:g}: "
                      f"{2 ** (depth * s.enum_width)} sub-networks", fontsize=9)
    ax_rule.legend(fontsize=7)
    for i, label in enumerate(("none", "dropout")):
        rows = [r for r in width_summary if f"{label}_test_error" in r]
        ax_width.errorbar([r["width"] for r in rows], [r[f"{label}_test_error"] for r in rows],
                          yerr=[r[f"{label}_test_error_std"] for r in rows], marker="o", capsize=3, color=f"C{i}",
                          label="no dropout" if label == "none" else f"dropout p={s.p:g}")
    ax_width.set_xscale("log", base=2)
    ax_width.set_xlabel("hidden width")
    ax_width.set_ylabel(f"test error (mean ± std, {len(s.seeds)} seeds)")
    ax_width.set_title("dropout needs larger models (Goodfellow §7.12)", fontsize=9)
    ax_width.legend(fontsize=8)
    fig.tight_layout()
    return fig
