"""``+experiment=adversarial``: adversarial examples and the linearity argument (Goodfellow et
al. 2015; Goodfellow, Bengio & Courville §7.13).

1. Linearity: for a linear score wᵀx the L∞ perturbation of size ε that raises it most is
   η = ε·sign(w), which changes it by ε‖w‖₁; with weights of a fixed typical size m that is
   ε·m·n, growing linearly with the input dimension n, while the score's own spread grows like
   ‖w‖₂ ∝ √n and a random sign perturbation of the same size moves it by only about ε‖w‖₂.
   For each n in ``extra.dims`` (and ``extra.linear_seeds`` draws of w ~ N(0, 1)ⁿ and
   x ~ N(0, 1)ⁿ) the experiment runs the PGD attack of ``regularizer.adversarial`` on the
   two-class linear model with logits (0, wᵀx) and records the change it finds beside ε‖w‖₁,
   the random-sign change and ‖w‖₂ (``linearity.csv``, ``linearity.png``).
2. Trained models: ``cfg.model`` trained plainly (``mix=0``: the regularizer only evaluates)
   and with FGSM training (``regularizer.adversarial.mix``), each for ``extra.seeds``, with the
   PGD evaluation of the regularizer (``variant=<standard|fgsm>/seed=<s>/``; metrics.json
   ``extra``); then each final model under FGSM and PGD at every ε of ``extra.eps_list``
   (``robustness.csv``, ``robustness.png``), and the saved adversarial examples of the first
   plain run drawn as signals or images (``examples.png``).
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from omegaconf import DictConfig

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._runs import run_variants, select
from regexp.experiments._settings import require, settings
from regexp.models import build_model
from regexp.regularizers.adversarial import fgsm, pgd
from regexp.tasks import register_task
from regexp.train.io import load_tensors, read_json

ADV = "adversarial"


@dataclass
class Settings:
    dims: List[int] = field(default_factory=lambda: [10, 40, 160, 640, 2560, 10240])
    linear_seeds: int = 5
    random_signs: int = 100  # random ±ε perturbations averaged per draw
    eps_list: List[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


def linear_model(w: torch.Tensor) -> nn.Module:
    """Logits (0, wᵀx): class 1's margin over class 0 is the linear score."""
    model = nn.Linear(len(w), 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros_like(w), w]))
    return model


def linearity_rows(dims: List[int], draws: int, signs: int, eps: float, steps: int, alpha: float) -> List[Dict]:
    rows = []
    for n in dims:
        for seed in range(draws):
            g = torch.Generator().manual_seed(seed)
            w, x = torch.randn(n, generator=g), torch.randn(1, n, generator=g)
            model = linear_model(w)
            y = torch.zeros(1, dtype=torch.long)  # the loss of class 0 rises with wᵀx
            score = lambda v: (v @ w).item()  # noqa: E731
            x_pgd = pgd(model, x, y, eps, steps, alpha)
            x_fgsm = fgsm(model, x, y, eps)
            r = eps * (torch.randint(0, 2, (signs, n), generator=g) * 2 - 1)
            rows.append({"n": n, "draw": seed, "eps": eps, "eps_l1_norm_w": eps * w.abs().sum().item(),
                         "pgd_change": score(x_pgd) - score(x), "fgsm_change": score(x_fgsm) - score(x),
                         "random_sign_change": (r @ w).abs().mean().item(), "l2_norm_w": w.norm().item(),
                         "pgd_linf": (x_pgd - x).abs().max().item()})
    return rows


def _mean_sd(values: List[float]):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _linearity_figure(rows: List[Dict], title: str):
    dims = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, style, label in (("eps_l1_norm_w", "k-", "ε‖w‖₁ (the formula)"),
                              ("pgd_change", "o", "found by PGD"),
                              ("random_sign_change", "s--", "random ±ε perturbation (mean |change|)"),
                              ("l2_norm_w", "^:", "‖w‖₂: the typical size of wᵀx itself")):
        m = [_mean_sd([r[key] for r in rows if r["n"] == n])[0] for n in dims]
        axes[0].plot(dims, m, style, label=label, mfc="none" if key == "pgd_change" else None, ms=8)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("input dimension n")
    axes[0].set_ylabel("change of the score wᵀx")
    axes[0].legend(fontsize=8)
    axes[0].set_title("worst case grows like n, random like √n", fontsize=9)
    ratio = [_mean_sd([r["pgd_change"] / r["l2_norm_w"] for r in rows if r["n"] == n]) for n in dims]
    axes[1].errorbar(dims, [m for m, _ in ratio], yerr=[s for _, s in ratio], fmt="o-", capsize=4)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("input dimension n")
    axes[1].set_ylabel("PGD change / ‖w‖₂")
    axes[1].set_title("the attack against the score's own spread (≈ ε√(2n/π))", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def robustness_rows(cfg: DictConfig, runs: List[Dict], eps_list: List[float], steps: int) -> List[Dict]:
    out = []
    for run in runs:
        if run["status"] != "completed":
            continue
        rcfg = copy.deepcopy(cfg)
        rcfg.seed = run["seed"]
        data = load_data(rcfg.data, rcfg.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        model.load_state_dict(load_tensors(Path(run["run_dir"]) / "model.pt", "model file",
                                           "delete the run folder and run the experiment again"))
        model.eval()
        x, y = data.x_test, data.y_test
        for eps in eps_list:
            alpha = 2.5 * eps / max(steps, 1) if eps > 0 else 1.0
            row = {"variant": run["variant"], "seed": run["seed"], "eps": eps}
            for attack, x_adv in (("fgsm", fgsm(model, x, y, eps)), ("pgd", pgd(model, x, y, eps, steps, alpha))):
                with torch.no_grad():
                    row[f"{attack}_test_acc"] = (model(x_adv).argmax(1) == y).float().mean().item()
            out.append(row)
    return out


def _robustness_figure(rows: List[Dict], eps_list: List[float], title: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, variant in enumerate(sorted({r["variant"] for r in rows}, reverse=True)):
        for attack, style in (("pgd", "-o"), ("fgsm", "--s")):
            stats = [_mean_sd([r[f"{attack}_test_acc"] for r in select(rows, variant=variant, eps=e)])
                     for e in eps_list]
            ax.errorbar(eps_list, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, color=f"C{i}",
                        capsize=3, label=f"{variant} training, {attack.upper()} attack")
    ax.set_xlabel("ε (L∞ size of the perturbation)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _examples_figure(saved: Dict[str, torch.Tensor], title: str):
    k = min(6, len(saved["label"]))
    image = saved["clean"].dim() == 4
    fig, axes = plt.subplots(3 if image else 2, k if image else 3, figsize=(2.2 * k if image else 12, 6.5),
                             squeeze=False)
    flat = [ax for row in axes for ax in row]
    for j in range(k if image else min(k, 6)):
        label, clean_p, pgd_p = (int(saved[n][j]) for n in ("label", "clean_pred", "pgd_pred"))
        if image:
            for row, (img, name) in enumerate(((saved["clean"][j], f"clean: {clean_p}"),
                                               (saved["pgd"][j], f"PGD: {pgd_p}"),
                                               (saved["pgd"][j] - saved["clean"][j], "perturbation"))):
                axes[row][j].imshow(img.mean(0).numpy(), cmap="gray" if row < 2 else "coolwarm")
                axes[row][j].set_title(f"label {label}, {name}" if row == 0 else name, fontsize=8)
                axes[row][j].axis("off")
        else:
            ax = flat[j]
            ax.plot(saved["clean"][j, 0].numpy(), color="k", label=f"clean: predicted {clean_p}")
            ax.plot(saved["pgd"][j, 0].numpy(), color="C3", lw=1, label=f"PGD: predicted {pgd_p}")
            ax.set_title(f"test signal {j}, label {label}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@register_task("adversarial")
def adversarial(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, ADV)
    require(ADV in cfg.regularizer, "regularizer", list(cfg.regularizer), "a list holding adversarial")
    rc = cfg.regularizer[ADV]
    require(rc.pgd_steps >= 1, f"regularizer.{ADV}.pgd_steps", rc.pgd_steps, "an integer >= 1 (the attack measured)")
    require(rc.eps > 0, f"regularizer.{ADV}.eps", rc.eps, "a number > 0")
    require(all(n >= 1 for n in s.dims) and s.dims, "extra.dims", s.dims, "a non-empty list of integers >= 1")
    require(all(e >= 0 for e in s.eps_list) and s.eps_list, "extra.eps_list", s.eps_list,
            "a non-empty list of numbers >= 0")
    require(s.linear_seeds >= 1, "extra.linear_seeds", s.linear_seeds, "an integer >= 1")
    require(s.random_signs >= 1, "extra.random_signs", s.random_signs, "an integer >= 1")
    require(len(s.seeds) >= 1, "extra.seeds", s.seeds, "a non-empty list of integers")
    eps = rc.eps if rc.pgd_eps is None else rc.pgd_eps
    alpha = rc.pgd_step_size if rc.pgd_step_size is not None else 2.5 * eps / rc.pgd_steps
    linear = linearity_rows(s.dims, s.linear_seeds, s.random_signs, eps, rc.pgd_steps, alpha)
    variants = {}
    for name, mix in (("standard", 0.0), ("fgsm", rc.mix)):
        v = copy.deepcopy(cfg)
        v.task = "train"
        v.extra = {}
        v.regularizer[ADV].mix = mix
        v.regularizer[ADV].examples = max(rc.examples, 6)
        variants[name] = v
    runs = run_variants(variants, s.seeds, out_dir)
    for r in runs:
        if r["status"] == "completed":
            extra = read_json(Path(r["run_dir"]) / "metrics.json")["extra"]
            r.update({k.split("/")[1]: extra[k] for k in extra if k.startswith(f"{ADV}/")})
    robust = robustness_rows(cfg, runs, s.eps_list, rc.pgd_steps)
    where = f"{cfg.model.name} on {cfg.data.name}, {cfg.trainer.epochs} epochs"
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.table("linearity", linear)
        out.table("results", runs)
        out.table("robustness", robust)
        out.figure("linearity", _linearity_figure(
            linear, f"linear score wᵀx, w ~ N(0, 1)ⁿ: L∞ perturbation ε = {eps}, PGD {rc.pgd_steps} steps"))
        if robust:
            out.figure("robustness", _robustness_figure(
                robust, s.eps_list, f"{where}, PGD {rc.pgd_steps} steps of 2.5ε/{rc.pgd_steps}"))
        first = next((r for r in runs if r["status"] == "completed" and r["variant"] == "standard"), None)
        if first is not None:
            saved = load_tensors(Path(first["run_dir"]) / "adversarial_examples.pt", "adversarial examples",
                                 "delete the run folder and run the experiment again")
            out.figure("examples", _examples_figure(
                saved, f"{where}, plain training, seed {first['seed']}: PGD at ε = {eps}"))
    print(text(linear, runs))
    failed = sum(r["status"] != "completed" for r in runs)
    return {"status": "completed" if not failed else "failed", "runs": len(runs), "failed": failed}


def text(linear: List[Dict], runs: List[Dict]) -> str:
    lines = ["n       eps*|w|_1   PGD change  random change   |w|_2"]
    for n in sorted({r["n"] for r in linear}):
        rs = [r for r in linear if r["n"] == n]
        m = {k: statistics.mean(r[k] for r in rs) for k in ("eps_l1_norm_w", "pgd_change", "random_sign_change",
                                                            "l2_norm_w")}
        lines.append(f"{n:<7} {m['eps_l1_norm_w']:>10.3f} {m['pgd_change']:>11.3f} "
                     f"{m['random_sign_change']:>14.3f} {m['l2_norm_w']:>8.3f}")
    for variant in ("standard", "fgsm"):
        done = [r for r in select(runs, variant=variant) if r["status"] == "completed"]
        if done:
            parts = []
            for key in ("clean_test_acc", "fgsm_test_acc", "pgd_test_acc"):
                m, sd = _mean_sd([r[key] for r in done])
                parts.append(f"{key} {m:.4f} ± {sd:.4f}")
            lines.append(f"{variant} training ({len(done)} seeds): " + ", ".join(parts))
    return "\n".join(lines)
