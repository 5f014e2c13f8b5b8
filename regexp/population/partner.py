"""Joint parameter tying in a population: each member's partner model, stacked.

A lone joint run (``parameter_tying.mode=joint``, regexp/regularizers/parameter_tying.py)
trains a partner B beside its model A: loss = CE_A + CE_B(batch_B) + λ‖w_A − w_B‖² over the
tied tensors. Here each member's partner is built (its seed, its data, the global generator
restored around it) and, on resume, restored by the member's own ``ParameterTying``, as in
its lone run; the partners are then stacked into a second model of the bucket's class, fed
each step one batch per member from the member's own partner data in the order of the
member's own partner generator (the regularizer's, so its checkpoint state stays current),
and stepped by a :class:`StackedOptimizer` of the members' rule and values, as the lone
optimizer steps the partner's extra group (same lr, schedule and optimizer weight decay).
The partner is plain: no dropout, noise, clipping or decoupled decay reach it (they act on
A); under SAM the ascent moves it too and the second pass reuses its batch. The term is
each member's CE_B + λ_m Σ‖w_A,m − w_B,m‖² (``tying_penalty`` on the stacked tensors;
padded units are 0 in both models and tie 0 to 0).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from regexp.errors import ConfigError
from regexp.population.optim import StackedOptimizer
from regexp.population.stacked_mlp import StackedMLP
from regexp.regularizers.parameter_tying import KEY, ParameterTying, tying_penalty

NAME = ParameterTying.name


def _reg(member) -> ParameterTying:
    return next(r for r in member.regs if r.name == NAME)


def stack_like(net, models, widths, width, input_shape, model_cfg, device: torch.device):
    """``models`` stacked into the class of ``net`` (the bucket's), padded as its members are."""
    if isinstance(net, StackedMLP):
        return StackedMLP(models, widths, width, model_cfg.activation, device, False)
    return type(net)(models, widths, width, input_shape, device)


class StackedPartners:
    """The members' partners, their data and batch order, their optimizer, and the stacked term."""

    def __init__(self, members: List, net, width, make_opt: Callable[[List[torch.Tensor]], StackedOptimizer],
                 device: torch.device):
        regs = [_reg(m) for m in members]
        self.regs, self.device = regs, device
        shapes = {(tuple(r.data.input_shape), r.data.num_classes, len(r.y)) for r in regs}
        if len(shapes) != 1:
            raise ConfigError(f"{KEY}.partner_data: members of one population have partner tasks of different "
                              f"shapes or sizes {sorted(shapes)}; use sweep.engine=serial")
        cfg = members[0].cfg
        self.net = stack_like(net, [r.partner for r in regs], [m.width for m in members], width,
                              regs[0].data.input_shape, cfg.model, device)
        self.tied = list(regs[0].tied)  # by the lone names (the same for every member: one config)
        self.lam = torch.tensor([float(r.cfg.lam) for r in regs], device=device)
        self.x = torch.stack([r.x.flatten(1) for r in regs]).to(device)  # (M, n, D), as PopulationData
        self.y = torch.stack([r.y for r in regs]).to(device)
        self.n = self.y.shape[1]
        self.batch_size = regs[0].cfg.partner_batch_size
        # where the lone regularizers are in their partner epochs (their checkpoints' after resume)
        self.perm = torch.stack([r.perm for r in regs]).to(device) if regs[0].perm is not None else None
        self.step = regs[0].step
        self.batch: Optional[tuple] = None
        self.sums = torch.zeros(len(regs), 2, device=device)  # the epoch's partner loss and examples so far
        self.opt = make_opt(self.params)

    @property
    def params(self) -> List[torch.Tensor]:
        """The lone partner's parameters in its group's order (all of them train)."""
        return self.net.params

    def draw(self, batch: int) -> None:
        """The step's partner batch of every member (``batch``: A's, the partner's size unless
        ``partner_batch_size`` is set), from each member's own partner order."""
        bs = min(self.batch_size or batch, self.n)
        if self.perm is None or self.step * bs >= self.n:
            self.perm = torch.stack([torch.randperm(self.n, generator=r.order) for r in self.regs]).to(self.device)
            self.step = 0
        idx = self.perm[:, self.step * bs:(self.step + 1) * bs]
        self.step += 1
        self.batch = (self.x.gather(1, idx.unsqueeze(2).expand(-1, -1, self.x.shape[2])), self.y.gather(1, idx))

    def penalty(self, net) -> torch.Tensor:
        """(M,) CE_B of each member's partner batch plus λ_m Σ‖w_A − w_B‖² over the tied tensors."""
        xb, yb = self.batch
        logits = self.net.forward(xb).float()
        m, b, c = logits.shape
        ce = F.cross_entropy(logits.reshape(m * b, c), yb.reshape(-1), reduction="none").view(m, b).mean(1)
        # every pass counts, SAM's second one too
        self.sums += torch.stack([ce.detach() * b, torch.full_like(ce, float(b)).detach()], 1)
        own = {name: p for name, p, _ in net.named_params()}
        other = {name: p for name, p, _ in self.net.named_params()}
        return ce + tying_penalty([(own[k], other[k]) for k in self.tied], self.lam, True)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def keep(self, idx: List[int]) -> None:
        sel = torch.tensor(idx, dtype=torch.long)
        on = sel.to(self.device)
        self.regs = [self.regs[i] for i in idx]
        self.net.keep(sel)
        self.opt.keep(sel)
        self.opt.set_params(self.params)
        self.lam, self.x, self.y, self.sums = (t.index_select(0, on) for t in (self.lam, self.x, self.y, self.sums))
        if self.perm is not None:
            self.perm = self.perm.index_select(0, on)

    @torch.no_grad()
    def sync(self, k: int, model, net) -> None:
        """Member k's partner, its place in the partner epoch and its loss sums so far into its
        lone regularizer, and its A weights into its lone ``model`` (the distance it logs and
        reports is between those two; its checkpoint holds the partner's state)."""
        r = self.regs[k]
        model.load_state_dict(net.member_state(k))
        r.partner.load_state_dict(self.net.member_state(k))
        r.perm = None if self.perm is None else self.perm[k].clone()
        r.step = self.step
        r.sums += self.sums[k].to(r.sums.device)  # moved: the lone log reads and zeroes them
        self.sums[k].zero_()

    def member_opt_state(self, k: int) -> List[Dict[str, torch.Tensor]]:
        """Member k's optimizer state of its partner's parameters, unpadded, under torch.optim's names."""
        out: List[Dict[str, torch.Tensor]] = [dict() for _ in self.params]
        for key, ts in self.opt.state.items():
            if key == "step":
                for d, s in zip(out, ts):
                    d[key] = s.detach().cpu().clone()
                continue
            for d, t in zip(out, self.net.member_state(k, ts).values()):
                d[key] = t
        return out

    def restore(self, states: List[Dict], first: int, steps: int) -> None:
        """The members' checkpointed partner state (torch.optim's entries ``first`` ..., one dict
        per member) into the stacked optimizer."""
        self.opt.steps = steps
        for key, v in states[0].get(first, {}).items():
            if v is None:  # torch's placeholder (SGD without momentum): no state
                continue
            per = [[st[first + j][key] for st in states] for j in range(len(self.params))]
            self.opt.state[key] = ([ts[0].to(self.device) for ts in per] if key == "step"
                                   else [self.net.stack(ts, p) for ts, p in zip(per, self.params)])


def stacked_partners(members: List, net, width, make_opt, device: torch.device) -> Optional[StackedPartners]:
    """The bucket's partners, or None unless its members tie jointly."""
    tying = members[0].cfg.regularizer.get(NAME)
    if tying is None or tying.mode != "joint":
        return None
    return StackedPartners(members, net, width, make_opt, device)
