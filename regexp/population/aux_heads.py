"""The ``multi_task`` regularizer's auxiliary heads of a bucket's members, stacked.

Each member's head a(h) = W h + c (built, initialized and, on resume, restored by its own
``MultiTask`` regularizer, as in a lone run) becomes a slice of W (M, T, width) and c
(M, 1, T), its columns where the stacked model keeps the member's features (``columns``: a
prefix, or a Transformer's head-by-head embedding); the columns of padded units are zero and
stay zero (their features are exactly 0, so is their gradient). The term is the regularizer's
own ``aux_term`` on the features the output layer reads (``head_input``, which the stacked
forward records), against each member's standardized targets of its own training rows. The
heads are stepped by a :class:`StackedOptimizer` of the members' rule and values, as a lone
run's optimizer steps the head's parameter group (the same lr and schedule, no clipping:
``clip_grad_norm_`` sees the model's parameters only; under SAM the ascent moves the head too,
as the lone SAM's moves every group).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from regexp.population.optim import StackedOptimizer
from regexp.regularizers.multi_task import aux_term


class StackedHeads:
    def __init__(self, regs: List, columns: List[torch.Tensor], width: int, make_opt, device: torch.device):
        """``columns[m]``: where member m's features sit among the ``width`` the output layer reads."""
        self.regs, self.columns = regs, list(columns)
        t = regs[0].aux.out_features
        w = torch.zeros(len(regs), t, width)
        c = torch.zeros(len(regs), 1, t)
        for i, (r, cols) in enumerate(zip(regs, columns)):
            w[i][:, cols] = r.aux.weight.detach()
            c[i, 0] = r.aux.bias.detach()
        self.params = [w.to(device).requires_grad_(), c.to(device).requires_grad_()]
        self.z = torch.stack([r.z_train for r in regs]).to(device)  # (M, n, T)
        self.opt: StackedOptimizer = make_opt(self.params)
        self.idx: torch.Tensor = torch.empty(0)  # the step's batch: (M, B) positions in each training set

    def term(self, features: torch.Tensor, hp) -> torch.Tensor:
        """(M,) λ·MSE of the step's batch (``idx``), on the (M, B, width) features."""
        z = self.z.gather(1, self.idx.unsqueeze(2).expand(-1, -1, self.z.shape[2]))
        return aux_term(self.params[0], self.params[1], features, z, hp.lam, True)

    def step(self, factor: float) -> None:
        self.opt.step(factor)
        for p in self.params:
            p.grad = None

    def keep(self, sel: torch.Tensor) -> None:
        idx = sel.tolist()
        self.regs, self.columns = [self.regs[i] for i in idx], [self.columns[i] for i in idx]
        self.params = [p.detach().index_select(0, sel.to(p.device)).requires_grad_() for p in self.params]
        self.z = self.z.index_select(0, sel.to(self.z.device))
        self.opt.keep(sel)
        self.opt.set_params(self.params)

    def _unpad(self, k: int, t: torch.Tensor, j: int) -> torch.Tensor:
        """Member k's slice of parameter j's stacked tensor, in nn.Linear's layout (a copy)."""
        return t[k][:, self.columns[k]] if j == 0 else t[k, 0]

    def _pad_(self, k: int, out: torch.Tensor, j: int, value: torch.Tensor) -> None:
        """Write member k's ``value`` (nn.Linear's layout) into its slice of ``out``."""
        if j == 0:
            out[k][:, self.columns[k]] = value.to(out.device, out.dtype)
        else:
            out[k, 0] = value

    @torch.no_grad()
    def sync(self, k: int) -> None:
        """Member k's head into its regularizer (for its report and checkpoint state)."""
        aux = self.regs[k].aux
        aux.weight.copy_(self._unpad(k, self.params[0], 0))
        aux.bias.copy_(self._unpad(k, self.params[1], 1))

    def member_opt_state(self, k: int) -> List[Dict[str, torch.Tensor]]:
        """Member k's optimizer state of (weight, bias), unpadded, under torch.optim's names."""
        out: List[Dict[str, torch.Tensor]] = [dict(), dict()]
        for key, ts in self.opt.state.items():
            for j, (d, t) in enumerate(zip(out, ts)):
                d[key] = t.detach().cpu().clone() if key == "step" else self._unpad(k, t, j).detach().cpu().clone()
        return out

    def restore(self, states: List[Dict], offset: int, steps: int) -> None:
        """The members' optimizer state of their heads, from their checkpoints' optimizer states
        (``states[m]``: torch.optim's per-parameter dict; the head's parameters follow the
        model's ``offset`` ones, as the lone trainer's second parameter group)."""
        self.opt.steps = steps
        for key, v in states[0].get(offset, {}).items():
            if v is None:  # torch's placeholder (SGD without momentum): no state
                continue
            if key == "step":
                self.opt.state[key] = [states[0][offset + j][key].to(p.device) for j, p in enumerate(self.params)]
                continue
            stacked = []
            for j, p in enumerate(self.params):
                out = torch.zeros_like(p, requires_grad=False)
                for k, st in enumerate(states):
                    self._pad_(k, out, j, st[offset + j][key])
                stacked.append(out)
            self.opt.state[key] = stacked
