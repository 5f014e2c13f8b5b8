"""Ensembles and bagging: K members trained side by side, predicting with their mean probability.

``wrap_model`` replaces the model by an :class:`Ensemble` holding K members: member 0 is the
run's own model, member k > 0 is built again with its own seed (so ``components`` = 1 is the
plain run). Each member is trained on its own cross-entropy (the data loss is Σₖ Lₖ, members do
not see each other); with ``bootstrap`` member k's per-example losses are weighted by its
bootstrap counts (bagging, see :mod:`bootstrap`). The K members train as K stacked slices of
the run (regexp/population/ensemble.py). The ensemble predicts p(y|x) = (1/K) Σₖ pₖ(y|x) and
returns its log, so the run's metrics are the ensemble's;
``report`` puts the mean member's metrics beside them, and the members' squared-error variance v
and covariance c beside the ensemble's squared error and v/K + (K − 1)c/K (:mod:`ensemble_error`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.regularizers.base import Regularizer, register
from regexp.regularizers.bootstrap import bootstrap_counts
from regexp.regularizers.ensemble_error import decomposition, probability_errors


class Ensemble(nn.Module):
    def __init__(self, members: List[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [m(x) for m in self.members]
        log_p = torch.stack([F.log_softmax(z, 1) for z in logits])
        return torch.logsumexp(log_p, 0) - math.log(len(logits))  # ln of the mean probability


def member_seed(seed: int, k: int) -> int:
    return seed * 1_000_003 + k  # distinct for every (run seed, member) pair in practice


@torch.no_grad()
def _error_terms(model: Ensemble, x: torch.Tensor, y: torch.Tensor, split: str) -> Dict[str, float]:
    """Goodfellow §7.11 on the Brier errors pₖ(·|x) − onehot(y) of the members' probabilities."""
    was_training = model.training
    model.eval()
    try:
        probs = torch.stack([F.softmax(m(x), 1) for m in model.members])
    finally:
        model.train(was_training)
    d = decomposition(probability_errors(probs, y))
    return {f"ensemble/{split}_member_sq_error": d["v"], f"ensemble/{split}_member_error_cov": d["c"],
            f"ensemble/{split}_sq_error": d["measured"], f"ensemble/{split}_sq_error_v_c": d["theory"]}


@register
class EnsembleRegularizer(Regularizer):
    name = "ensemble"

    @dataclass
    class Config:
        components: int = 5  # K members
        bootstrap: bool = False  # bagging: each member on its own bootstrap resample

    ranges = {"components": (lambda v: v >= 1, "an integer >= 1")}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.counts = None
        # a population's (regexp/population/ensemble.py): its K models' loss sums of an unfinished
        # epoch, (K, 1 + penalties), kept in the checkpoint so a resumed epoch sums as before
        self.running: Optional[torch.Tensor] = None
        if cfg.bootstrap:
            g = torch.Generator().manual_seed(member_seed(ctx.seed, 7919))
            self.counts = bootstrap_counts(ctx.n_train, cfg.components, g).to(ctx.device)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from regexp.models import build_model

        members = [model]
        for k in range(1, self.cfg.components):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(member_seed(self.ctx.seed, k))
                members.append(build_model(self.ctx.model_cfg, self.ctx.input_shape,
                                           self.ctx.num_classes))
        return Ensemble(members).to(self.ctx.device)

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for split in ("train", "val", "test"):
            x, y = tensors[split]
            if not len(y):
                continue
            loss, acc = evaluate(model, x, y)
            member = [evaluate(m, x, y) for m in model.members]
            out[f"ensemble/{split}_acc"] = acc.item()
            out[f"ensemble/{split}_loss"] = loss.item()
            out[f"ensemble/member_mean_{split}_acc"] = torch.stack([a for _, a in member]).mean().item()
            out[f"ensemble/member_mean_{split}_loss"] = torch.stack([l for l, _ in member]).mean().item()
            if len(model.members) > 1:
                out.update(_error_terms(model, x, y, split))
        if self.counts is not None:
            out["ensemble/bootstrap_unique_fraction"] = (self.counts > 0).float().mean().item()
        return out

    def state_dict(self):
        out = {"counts": None if self.counts is None else self.counts.cpu()}
        if self.running is not None:
            out["running"] = self.running
        return out

    def load_state_dict(self, state) -> None:
        self.running = state.get("running")
        if state["counts"] is not None:
            self.counts = state["counts"].to(self.ctx.device)
