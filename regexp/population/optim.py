"""The update rules of ``regexp.optim`` applied to stacked parameters (M members at once).

Each hyperparameter is a Python float when all members share it and a float64 tensor
(M, 1, 1) otherwise; the per-step values are formed in float64 and rounded to float32
once, as torch does with its Python-float hyperparameters. With every hyperparameter
shared, the update is torch's own fused kernel (``_fused_sgd_`` / ``_fused_adam(w)_``, on
CPU and CUDA alike), applied to the stacked tensors: the same per-element arithmetic as
``torch.optim`` on a lone member. Otherwise the same steps as torch's foreach
implementation run with broadcast per-member values.

Padded units stay zero under every rule: their parameter and gradient are zero, so the
momentum buffer, Adam's moments and the decoupled decay all leave them at zero.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch

Hyper = Union[float, torch.Tensor]


def hyper(values: Sequence[float], device: torch.device) -> Hyper:
    """A float when all members agree, else a (M, 1, 1) float64 tensor."""
    vals = [float(v) for v in values]
    if all(v == vals[0] for v in vals):
        return vals[0]
    return torch.tensor(vals, dtype=torch.float64, device=device).view(-1, 1, 1)


def _f32(h: Hyper) -> Hyper:
    return h.float() if isinstance(h, torch.Tensor) else h


def _select(h: Hyper, idx: torch.Tensor) -> Hyper:
    return h.index_select(0, idx.to(h.device)) if isinstance(h, torch.Tensor) else h


class StackedOptimizer:
    """sgd / momentum / nesterov / adam / adamw over stacked parameters, lr = base · factor(t)."""

    def __init__(self, name: str, params: List[torch.Tensor], hp: Dict[str, Sequence[float]],
                 nesterov: bool, device: torch.device):
        self.name, self.nesterov, self.device = name, nesterov, device
        self.params = params
        self.adam = name in ("adam", "adamw")
        self.hp = {k: hyper(v, device) for k, v in hp.items()}
        if name == "adam":  # torch.optim.Adam gets no weight decay in regexp.optim
            self.hp["weight_decay"] = 0.0
        self.steps = 0
        self.state: Dict[str, List[torch.Tensor]] = {}
        self.fused = all(not isinstance(v, torch.Tensor) for v in self.hp.values())

    # ---------------------------------------------------------------- bookkeeping
    def set_params(self, params: List[torch.Tensor]) -> None:
        self.params = params

    def keep(self, idx: torch.Tensor) -> None:
        self.hp = {k: _select(v, idx) for k, v in self.hp.items()}
        self.state = {k: ts if k == "step" else [t.index_select(0, idx.to(t.device)) for t in ts]
                      for k, ts in self.state.items()}  # Adam's step count is shared

    def uses_momentum(self) -> bool:
        m = self.hp.get("momentum", 0.0)
        return isinstance(m, torch.Tensor) or m != 0.0

    # ---------------------------------------------------------------- the update
    @torch.no_grad()
    def step(self, factor: float) -> None:
        grads = [p.grad for p in self.params]
        self.steps += 1
        lr = self.hp["lr"] * factor
        if self.adam:
            self._adam(grads, lr)
        else:
            self._sgd(grads, lr)

    def _sgd(self, grads: List[torch.Tensor], lr: Hyper) -> None:
        mom, damp = self.hp.get("momentum", 0.0), self.hp.get("dampening", 0.0)
        first = "momentum_buffer" not in self.state
        if self.uses_momentum() and first:
            self.state["momentum_buffer"] = [torch.empty_like(g) for g in grads]
        bufs = self.state.get("momentum_buffer", [])
        if self.fused:
            torch._fused_sgd_(self.params, grads, bufs, weight_decay=0.0, momentum=mom, lr=lr,
                              dampening=damp, nesterov=self.nesterov, maximize=False,
                              is_first_step=first)
            return
        if bufs:
            if first:
                for b, g in zip(bufs, grads):
                    b.copy_(g)
            else:
                for b, g in zip(bufs, grads):
                    b.mul_(_f32(mom)).add_(g * _f32(1.0 - damp))
            grads = [g + b * _f32(mom) for g, b in zip(grads, bufs)] if self.nesterov else bufs
        neg = _f32(-lr)
        for p, g in zip(self.params, grads):
            p.add_(g * neg)

    def _adam(self, grads: List[torch.Tensor], lr: Hyper) -> None:
        hp = self.hp
        if not self.state:
            self.state = {"exp_avg": [torch.zeros_like(p) for p in self.params],
                          "exp_avg_sq": [torch.zeros_like(p) for p in self.params],
                          "step": [torch.zeros((), device=self.device) for _ in self.params]}
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        if self.fused:
            torch._foreach_add_(self.state["step"], 1.0)
            kernel = torch._fused_adamw_ if self.name == "adamw" else torch._fused_adam_
            kernel(self.params, grads, m, v, [], self.state["step"], lr=lr, beta1=hp["beta1"],
                   beta2=hp["beta2"], weight_decay=hp["weight_decay"], eps=hp["eps"],
                   amsgrad=False, maximize=False)
            return
        for s in self.state["step"]:
            s.add_(1.0)
        t = self.steps
        decay = _f32(1.0 - lr * hp["weight_decay"])
        bc1, bc2 = 1.0 - hp["beta1"] ** t, 1.0 - hp["beta2"] ** t
        step_size, bc2_sqrt = _f32(lr / bc1), _f32(bc2 ** 0.5)
        for p, g, ma, va in zip(self.params, grads, m, v):
            if isinstance(decay, torch.Tensor) or decay != 1.0:
                p.mul_(decay)
            ma.lerp_(g, _f32(1.0 - hp["beta1"]) if isinstance(hp["beta1"], torch.Tensor)
                     else 1.0 - hp["beta1"])
            va.mul_(_f32(hp["beta2"])).addcmul_(g * _f32(1.0 - hp["beta2"]), g)
            denom = va.sqrt().div_(bc2_sqrt).add_(_f32(hp["eps"]))
            p.sub_(ma / denom * step_size)

    def member_state(self, i: int) -> List[Dict[str, torch.Tensor]]:
        """Member ``i``'s per-parameter state slices, in torch.optim's key names."""
        out: List[Dict[str, torch.Tensor]] = [dict() for _ in self.params]
        for key, ts in self.state.items():
            for d, t in zip(out, ts):
                d[key] = t.detach().clone() if key == "step" else t[i].detach()
        return out

    def lr_of(self, i: int, factor: float) -> float:
        lr = self.hp["lr"]
        return float((lr[i] if isinstance(lr, torch.Tensor) else lr) * factor)
