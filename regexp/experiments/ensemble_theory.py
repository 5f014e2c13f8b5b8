"""``+experiment=ensemble_theory``: an ensemble's squared error against v/k + (k − 1)c/k for k = 1..K
members (Goodfellow et al. §7.11), for three ways of making the members differ:

- ``inits``: the same training set, each member its own seed (initialisation and batch order);
- ``bagging``: each member also on its own bootstrap resample (``regularizer.ensemble`` with one
  component and ``bootstrap=true``); member k has the same seed, so the same initial weights, as
  member k of ``inits``: only the data differ;
- ``models``: member k is ``extra.models[k mod len]`` (other widths, depths ...), its own seed.

Every member is one run of the framework's trainer (``<variant>/rep=<r>/...``); the experiment
then loads each ``model.pt``, takes its class probabilities on the test set and computes, for the
first k members, v (mean squared error of a member), c (mean covariance of two members' errors),
the ensemble's measured squared error and its test error. The errors are the Brier vectors
εₖ = pₖ(·|x) − onehot(y): the ensemble averages probabilities, so its error is exactly the members'
mean error and the identity holds to rounding (``regexp.regularizers.ensemble_error``). The curve
drawn through the measurements uses the v and c of all K members, v/k + (k − 1)c/k: the expected
squared error of an ensemble of k members drawn from the K.

Writes ``ensemble.png`` (squared error and test error against k, one colour per variant),
``members.csv`` (one row per member), ``curves.csv`` (variant × rep × k) and ``summary.csv``
(per variant: v, c, c/v and the K-member ensemble against its mean member, mean ± std over reps).
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from regexp.data import load_data
from regexp.experiments._figures import Outputs
from regexp.experiments._layers import initial_model
from regexp.experiments._runs import run_listed
from regexp.experiments._settings import require, require_choices, settings
from regexp.regularizers.ensemble import EnsembleRegularizer
from regexp.regularizers.ensemble_error import decomposition, probability_errors
from regexp.sweep import point_config
from regexp.tasks import register_task
from regexp.train.io import load_tensors

VARIANTS = ("inits", "bagging", "models")


@dataclass
class Settings:
    members: int = 5  # K
    reps: List[int] = field(default_factory=lambda: [0, 1, 2])  # independent ensembles per variant
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    # the "models" variant: member k trains with these overrides (cycled)
    models: List[Dict[str, Any]] = field(default_factory=lambda: [
        {"model.width": 100}, {"model.width": 50}, {"model.width": 200}, {"model.depth": 1},
        {"model.depth": 3}])


def member_seed(rep: int, k: int) -> int:
    return 1000 * rep + k


def _variant_config(cfg: DictConfig, variant: str) -> DictConfig:
    v = copy.deepcopy(cfg)
    v.extra = {}  # the runs do not read extra: a relaunch with other K or reps reuses them
    v.regularizer = {}
    if variant == "bagging":
        v.regularizer = {"ensemble": OmegaConf.structured(EnsembleRegularizer.Config(components=1, bootstrap=True))}
    return v


def _points(s: Settings, variant: str, rep: int) -> List[Dict[str, Any]]:
    return [{**(s.models[k % len(s.models)] if variant == "models" else {}), "seed": member_seed(rep, k)}
            for k in range(s.members)]


@torch.no_grad()
def _test_probs(vcfg: DictConfig, point: Dict[str, Any], run_dir: str, data) -> torch.Tensor:
    pcfg = point_config(vcfg, point)
    model = initial_model(pcfg.model, point["seed"], data.input_shape, data.num_classes)
    state = load_tensors(Path(run_dir) / "model.pt", "model file", "delete the run folder and run again")
    # bagging's runs hold their model inside a one-member Ensemble
    model.load_state_dict({k.removeprefix("members.0."): t for k, t in state.items()})
    model.eval()
    return F.softmax(model(data.x_test), 1)


def _check(s: Settings) -> None:
    require(s.members >= 2, "extra.members", s.members, "an integer >= 2 (a covariance needs two members)")
    require(len(s.reps) >= 1, "extra.reps", s.reps, "a non-empty list of integers")
    require(len(s.variants) >= 1, "extra.variants", s.variants, "a non-empty list")
    require_choices("extra.variants", s.variants, VARIANTS)
    require(len(s.models) >= 1, "extra.models", s.models, "a non-empty list of override dicts")


@register_task("ensemble_theory")
def ensemble_theory(cfg: DictConfig, out_dir: Path, overrides: List[str], sweep: bool) -> Dict:
    s = settings(cfg, Settings, "ensemble_theory")
    _check(s)
    data = load_data(cfg.data, cfg.seed)  # the test set does not depend on the seed
    members, curves, failed = [], [], 0
    for variant in s.variants:
        vcfg = _variant_config(cfg, variant)
        for rep in s.reps:
            points = _points(s, variant, rep)
            rows = run_listed(vcfg, points, out_dir / variant / f"rep={rep}")
            if any(r["status"] != "completed" for r in rows):
                failed += 1
                continue
            probs = torch.stack([_test_probs(vcfg, p, r["run_dir"], data) for p, r in zip(points, rows)])
            errors = probability_errors(probs, data.y_test)
            full = decomposition(errors)
            for k, (p, r) in enumerate(zip(points, rows)):
                members.append({"variant": variant, "rep": rep, "member": k, **p, "test_error": r["test_error"],
                                "sq_error": float(errors[k].double().pow(2).sum(1).mean()),
                                "run_dir": r["run_dir"]})
            for k in range(1, s.members + 1):
                d = decomposition(errors[:k])
                wrong = (probs[:k].mean(0).argmax(1) != data.y_test).double().mean()
                curves.append({"variant": variant, "rep": rep, "k": k, "v": d["v"], "c": d["c"],
                               "measured": d["measured"], "v_c": d["theory"],
                               "v_c_all": full["v"] / k + (k - 1) * full["c"] / k,
                               "test_error": float(wrong)})
    summary = _summary(s, curves, members)
    with Outputs(out_dir, cfg.logger.tensorboard) as out:
        out.table("members", members)
        out.table("curves", curves)
        out.table("summary", summary)
        if curves:
            out.figure("ensemble", _figure(s, curves))
    for r in summary:
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return {"status": "completed" if not failed else "failed", "ensembles": len(s.variants) * len(s.reps),
            "failed": failed}


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _summary(s: Settings, curves: List[Dict], members: List[Dict]) -> List[Dict]:
    out = []
    for variant in s.variants:
        last = [r for r in curves if r["variant"] == variant and r["k"] == s.members]
        if not last:
            continue
        row: Dict[str, Any] = {"variant": variant, "reps": len(last)}
        mine = [m for m in members if m["variant"] == variant]
        per_rep = {
            "v": [r["v"] for r in last], "c": [r["c"] for r in last], "c_over_v": [r["c"] / r["v"] for r in last],
            "ensemble_sq_error": [r["measured"] for r in last],
            "ensemble_test_error": [r["test_error"] for r in last],
            "member_test_error": [statistics.fmean(float(m["test_error"]) for m in mine if m["rep"] == r["rep"])
                                  for r in last]}
        for key, values in per_rep.items():
            ms = _mean_std(values)
            row[key], row[f"{key}_std"] = ms["mean"], ms["std"]
        out.append(row)
    return out


def _figure(s: Settings, curves: List[Dict]):
    fig, (ax_sq, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ks = list(range(1, s.members + 1))
    for i, variant in enumerate(s.variants):
        rows = [r for r in curves if r["variant"] == variant]
        if not rows:
            continue
        color = f"C{i}"
        mean = {key: [statistics.fmean(r[key] for r in rows if r["k"] == k) for k in ks]
                for key in ("measured", "v_c_all", "test_error")}
        c = statistics.fmean(r["c"] for r in rows if r["k"] == s.members)
        ax_sq.plot(ks, mean["measured"], "o", color=color, label=f"{variant}: measured")
        ax_sq.plot(ks, mean["v_c_all"], "-", color=color, label=f"{variant}: v/k + (k−1)c/k")
        ax_sq.axhline(c, color=color, ls=":", lw=0.8)
        ax_err.plot(ks, mean["test_error"], "o-", color=color, label=variant)
    ax_sq.set_xticks(ks)
    ax_err.set_xticks(ks)
    ax_sq.set_xlabel("members k")
    ax_sq.set_ylabel("test squared error ‖p̄ − onehot(y)‖²")
    ax_sq.set_title("ensemble squared error (dotted: c, the limit k → ∞)", fontsize=9)
    ax_sq.legend(fontsize=7)
    ax_err.set_xlabel("members k")
    ax_err.set_ylabel("test error of the mean probability")
    ax_err.legend(fontsize=7)
    fig.suptitle(f"Goodfellow §7.11 on MNIST-1D, mean over {len(s.reps)} ensembles per variant")
    fig.tight_layout()
    return fig
