"""Soft weight sharing in a population: each member's own learned mixture, stacked.

A lone run trains its mixture (μ, ξ = ln σ², η) as an optimizer group of its own with the
regularizer's lr (``param_groups()``). Here the members' mixtures are stacked as (M, 1, K)
tensors (the middle dimension lets the optimizer's (M, 1, 1) per-member values broadcast) and
updated by a second :class:`StackedOptimizer`: the same rule and values as the weights' one,
with each member's mixture lr, as torch steps each group of one optimizer on its own.
The penalty is the regularizer's own ``penalty_of`` on the stacked weights.

An ensemble's K models (the slices of one owner, regexp/population/ensemble.py) have one mixture,
as the former loop's regularizer attached to the Ensemble module had: one prior over all K models'
weights, started from their range. Each slice holds a copy of it, and the copies stay equal: the
penalty Ω is a sum over weights, so Ω over all K models is the sum of each slice's Ω under the
copy; the hyperprior on σ counts once (on the owner's first slice); before each step every copy's
gradient becomes the sum of its owner's copies' gradients, the one mixture's gradient, so each
copy takes the same step from the same optimizer state. SAM's ascent does the same first and
counts the mixture once in its owner's norm (regexp/optim/sam.py's ``once``), as the lone ascent's
one norm over the Ensemble's parameters and its one mixture.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch

from regexp.errors import ConfigError
from regexp.population.optim import StackedOptimizer
from regexp.regularizers.soft_weight_sharing import SoftWeightSharing

NAME = SoftWeightSharing.name
PARAMS = ("free_mu", "xi", "eta")  # the lone Mixture's parameters, in its (and its group's) order
SHARED_OR_OWN = ("pi0", "gamma_alpha", "gamma_beta")  # values the prior reads, per member when they differ


def _reg(member) -> SoftWeightSharing:
    return next(r for r in member.regs if r.name == NAME)


class StackedMixtures:
    """The members' mixtures, their optimizer, and the stacked penalty."""

    def __init__(self, members: List, net, opt_name: str, hypers: Dict[str, List[float]], nesterov: bool,
                 centered: bool, device: torch.device, amsgrad: bool = False):
        regs = [_reg(m) for m in members]
        self.regs = regs
        # the weights under the prior (an ensemble's: those of each slice's model, the same names)
        covered = [_covered(m.model, r) for m, r in zip(members, regs)]
        if any(c != covered[0] for c in covered):
            raise ConfigError("regularizer.soft_weight_sharing.layers: with ensemble it must cover the same "
                              "weights in each of the K models (the population stacks them); expected "
                              "substrings of a model's own parameter names, or [] for all")
        self.names = covered[0]
        self.params = [torch.stack([getattr(r.mixture, n).detach() for r in regs]).unsqueeze(1).to(device)
                       .requires_grad_() for n in PARAMS]
        self.lam = torch.tensor([r.lam for r in regs], device=device)
        self.shared = self._shared(device)
        self.opt = StackedOptimizer(opt_name, self.params, {**hypers, "lr": [float(r.cfg.lr) for r in regs]},
                                    nesterov, device, centered, amsgrad)
        self.masks = self._masks(net)
        self._owners()

    def _shared(self, device: torch.device) -> Dict[str, Union[float, torch.Tensor]]:
        """π₀ and the hyperprior's α, β: one value when the members agree (the lone run's
        arithmetic), else each member's as (M, 1, 1) float64 (penalty_of rounds once, as a lone
        run's Python float is)."""
        out: Dict[str, Union[float, torch.Tensor]] = {}
        for key in SHARED_OR_OWN:
            values = [float(r.cfg[key]) for r in self.regs]
            out[key] = values[0] if all(v == values[0] for v in values) else \
                torch.tensor(values, dtype=torch.float64, device=device).view(-1, 1, 1)
        return out

    def _masks(self, net) -> Optional[List[torch.Tensor]]:
        masks = net.param_masks()
        if masks is None:
            return None
        by_name = {name: m for (name, _, _), m in zip(net.named_params(), masks)}
        return [by_name[n] for n in self.names]

    def _owners(self) -> None:
        """Which slices share one mixture (an ensemble's: its K models share its regularizer)."""
        ids: Dict[int, int] = {}
        owner = [ids.setdefault(id(r), len(ids)) for r in self.regs]
        self.owner = None if len(ids) == len(owner) else torch.tensor(owner, device=self.lam.device)
        self.owners = len(ids)
        self.first = None if self.owner is None else torch.tensor(
            [float(i == 0 or owner[i - 1] != o) for i, o in enumerate(owner)], device=self.lam.device)

    def penalty(self, net) -> torch.Tensor:
        """(M,) λ·Ω of each member's real weights under its own mixture."""
        by_name = {name: p for name, p, _ in net.named_params()}
        hp = self.regs[0].hypers(self.lam, *self.params, masks=self.masks)
        hp.__dict__.update(self.shared)
        weights = [by_name[n] for n in self.names]
        if self.first is None or not (torch.is_tensor(hp.gamma_alpha) or hp.gamma_alpha):
            return SoftWeightSharing.penalty_of(weights, hp, True)
        hyper = self.lam * SoftWeightSharing.hyperprior_of(hp, True) * self.first  # once per owner
        hp.gamma_alpha = 0.0
        return SoftWeightSharing.penalty_of(weights, hp, True) + hyper

    def step(self, factor: float) -> None:
        """The mixtures' update (an ensemble's copies each with its owner's summed gradient)."""
        self.sum_copies()
        self.opt.step(factor)

    def sum_copies(self) -> None:
        """An ensemble's copies' gradients, each made its owner's sum (the one mixture's gradient)."""
        if self.owner is not None:
            with torch.no_grad():
                for p in self.params:
                    total = torch.zeros(self.owners, *p.shape[1:], device=p.device)
                    p.grad = total.index_add_(0, self.owner, p.grad).index_select(0, self.owner)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def keep(self, idx: List[int], net) -> None:
        sel = torch.tensor(idx, dtype=torch.long)
        self.regs = [self.regs[i] for i in idx]
        with torch.no_grad():
            self.params = [p.index_select(0, sel.to(p.device)).requires_grad_() for p in self.params]
        self.lam = self.lam.index_select(0, sel.to(self.lam.device))
        self.shared = self._shared(self.lam.device)
        self.opt.keep(sel)
        self.opt.set_params(self.params)
        self.masks = self._masks(net)
        self._owners()

    @torch.no_grad()
    def sync(self, k: int) -> None:
        """Member k's mixture into its lone regularizer (its logs, report and checkpoint read it)."""
        mixture = self.regs[k].mixture
        for name, p in zip(PARAMS, self.params):
            getattr(mixture, name).copy_(p[k, 0])

    def member_opt_state(self, k: int) -> List[Dict[str, torch.Tensor]]:
        """Member k's optimizer state of its mixture's parameters, under torch.optim's names."""
        out: List[Dict[str, torch.Tensor]] = [dict() for _ in self.params]
        for key, ts in self.opt.state.items():
            for d, t in zip(out, ts):
                d[key] = (t if key == "step" else t[k, 0]).detach().cpu().clone()
        return out

    def restore(self, states: List[Dict[int, Dict[str, torch.Tensor]]], first: int, steps: int) -> None:
        """The members' checkpointed mixture state (torch.optim's entries ``first`` ..., one dict per
        member) into the stacked optimizer."""
        self.opt.steps = steps
        for key in states[0].get(first, {}):
            per = [[st[first + j][key] for st in states] for j in range(len(self.params))]
            self.opt.state[key] = ([ts[0].to(p.device) for ts, p in zip(per, self.params)] if key == "step"
                                   else [torch.stack(ts).unsqueeze(1).to(p.device, p.dtype)
                                         for ts, p in zip(per, self.params)])


def _covered(model, reg: SoftWeightSharing) -> List[str]:
    """The names, in ``model``'s own naming, of its parameters under ``reg``'s prior."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in reg.params if id(p) in names]


def stacked_mixtures(members: List, net, opt_name: str, hypers: Dict[str, List[float]], nesterov: bool,
                     centered: bool, device: torch.device, amsgrad: bool = False) -> Optional[StackedMixtures]:
    """The bucket's mixtures, or None when its members have no soft weight sharing."""
    if NAME not in members[0].cfg.regularizer:
        return None
    return StackedMixtures(members, net, opt_name, hypers, nesterov, centered, device, amsgrad)
