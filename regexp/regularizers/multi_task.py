"""Multi-task learning (Prince, UDL §9.3.6; Goodfellow et al., Deep Learning §7.7): a second
head on the network's shared trunk predicts an auxiliary target, and the loss is the weighted
sum L = CE(f(x), y) + λ · (1/(B·T)) Σ_b Σ_t (a_t(h_b) − z_bt)², h the features the output layer
(``model.head``) reads, a = W h + c the auxiliary linear head, z the T targets standardized
with the training set's mean and standard deviation (so that λ weighs tasks of any units alike).

The auxiliary targets are what the MNIST-1D generator knows about every signal it made
(``regexp.data.mnist1d.FACTORS``): the shift, the amplitude scale, the shear, the padding.
Predicting them asks the trunk for features of where and how the digit was drawn, which the
digit label alone may never demand: the hope of multi-task learning is that such features are
also what the digit needs when labels are few. The head and its loss exist only in training:
the model's own outputs, evaluation and saved weights are those of the single-task network.

The auxiliary term is logged as ``penalty/multi_task``. The targets belong to the generated
signals: an input transformation (``augmentation``) changes a signal's shift but not its target.
The term is :func:`aux_term` on a population's stacked heads (``regexp.population.aux_heads``,
listed in ``regexp.population.compat.BATCH_TERMS``); the regularizer builds each member's head,
targets, report and checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.errors import ConfigError
from regexp.regularizers.base import Regularizer, per_member, register

KEY = "regularizer.multi_task"


def row_index(x: torch.Tensor, source: torch.Tensor, what: str) -> torch.Tensor:
    """Position in ``source`` of each row of ``x`` (every split and subset regexp makes is a
    selection of the generated signals, so each row is found exactly)."""
    where = {row.numpy().tobytes(): i for i, row in enumerate(source.flatten(1))}
    found = [where.get(row.numpy().tobytes(), -1) for row in x.cpu().flatten(1)]
    if -1 in found:
        raise ConfigError(f"{KEY}: {found.count(-1)} {what} signals are not among the generated MNIST-1D "
                          "signals, so they have no generator factors; use data.name=mnist1d")
    return torch.tensor(found)


def aux_term(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, z: torch.Tensor, lam,
             stacked: bool) -> torch.Tensor:
    """λ · (1/(B·T)) Σ_b Σ_t (W h_b + c − z_b)_t²: a lone head's weight (T, F) and bias (T,) on
    features (B, F), or the members' stacked (M, T, F) and (M, 1, T) on (M, B, F) with an (M,)
    λ, giving one value per member."""
    if not stacked:
        return lam * F.mse_loss(F.linear(features, weight, bias), z)
    pred = torch.baddbmm(bias, features, weight.transpose(1, 2))
    return per_member(lam, True, 1) * (pred - z).pow(2).mean((1, 2))


@register
class MultiTask(Regularizer):
    name = "multi_task"

    @dataclass
    class Config:
        lam: float = 1.0
        targets: List[str] = field(default_factory=lambda: ["shift"])  # of regexp.data.mnist1d.FACTORS

    ranges = {"lam": (lambda v: v >= 0, "a number >= 0")}

    @classmethod
    def validate(cls, cfg, prefix: str) -> None:
        from regexp.data.mnist1d import FACTORS

        super().validate(cfg, prefix)
        bad = [t for t in cfg.targets if t not in FACTORS]
        if bad or not cfg.targets or len(set(cfg.targets)) != len(cfg.targets):
            raise ConfigError(f"{prefix}.targets={list(cfg.targets)} is invalid: expected a non-empty list of "
                              f"distinct factors from {', '.join(FACTORS)}")

    def attach(self, model) -> None:
        from regexp.data.mnist1d import FACTORS, load_mnist1d_factors

        ctx = self.ctx
        if ctx.data is None or ctx.data_cfg is None or ctx.data_cfg.name != "mnist1d":
            raise ConfigError(f"{KEY} needs data.name=mnist1d (its generator's factors are the auxiliary "
                              f"targets), not {getattr(ctx.data_cfg, 'name', None)}")
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"{KEY} needs a model whose output layer is a Linear named head (mlp, cnn, gru, "
                              "transformer), not a wrapped one (ensemble)")
        x_source, f_source, _, _ = load_mnist1d_factors(ctx.data_cfg)
        cols = [FACTORS.index(t) for t in self.cfg.targets]
        self.train_targets = f_source[row_index(ctx.data.x_train, x_source, "training")][:, cols]
        self.mean, self.std = self.train_targets.mean(0), self.train_targets.std(0).clamp_min(1e-8)
        self.z_train = self.standardize(self.train_targets).to(ctx.device)
        self.z_val = (self.standardize(f_source[row_index(ctx.data.x_val, x_source, "validation")][:, cols])
                      if len(ctx.data.y_val) else None)
        self.aux = nn.Linear(head.in_features, len(cols)).to(ctx.device)
        head.register_forward_pre_hook(self._keep_features)
        self._features = None

    def standardize(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.mean) / self.std

    def _keep_features(self, module, inputs) -> None:
        self._features = inputs[0]

    @classmethod
    def penalizes(cls) -> bool:
        # a loss term with no ``*_of`` formula: the engine computes it from its stacked heads
        return True

    def param_groups(self) -> List[dict]:
        return [{"params": list(self.aux.parameters())}]

    @torch.no_grad()
    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        if self.z_val is None:
            return {}
        was = model.training
        model.eval()
        model(tensors["val"][0])
        model.train(was)
        per_target = (self.aux(self._features) - self.z_val.to(self._features.device)).pow(2).mean(0)
        # on standardized targets, 1 − MSE is the R² of predicting them from the trunk's features
        return {f"multi_task/val_r2_{t}": 1 - v for t, v in zip(self.cfg.targets, per_target.tolist())}

    def state_dict(self) -> Dict:
        return {"aux": self.aux.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.aux.load_state_dict(state["aux"])
