"""The update rules of ``regexp.optim`` applied to stacked parameters (M members at once).

Each hyperparameter is a Python float when all members share it and a float64 tensor
(M, 1, 1) otherwise; the per-step values are formed in float64 and rounded to float32
once, as torch does with its Python-float hyperparameters. With every hyperparameter
shared, the update is torch's own fused kernel (``_fused_sgd_`` / ``_fused_adagrad_`` /
``_fused_adam(w)_``, on CPU and CUDA alike; RMSprop and AdaDelta, which have none, torch's
foreach steps), applied to the stacked tensors: the same per-element arithmetic as
``torch.optim`` on a lone member. Otherwise the same steps as torch's foreach
implementation run with broadcast per-member values.

Adam's ``amsgrad`` (shared: it adds a state tensor) keeps torch's ``max_exp_avg_sq``, the
elementwise maximum of every second-moment estimate so far, and divides by its root instead:
denom = √max(v_1..v_t)/√(1-β2^t) + ε, torch's formula (the bias correction is the current
step's, applied to the maximum).

Padded units stay zero under every rule: their parameter and gradient are zero, so the
momentum buffer, Adam's moments (and their maximum) and the decoupled decay all leave them at zero, and the
adaptive rules' steps g/(√h + ε) (AdaGrad, RMSprop) and AdaDelta's √(Δ+ε)/√(h+ε)·g are zero.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch

from regexp.population.schedule import Factor, factor_of

Hyper = Union[float, torch.Tensor]
ADAPTIVE = ("adagrad", "rmsprop", "adadelta")


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
    """sgd / momentum / nesterov / adagrad / rmsprop / adadelta / adam / adamw over stacked
    parameters, lr = base · factor(t) (``factor``: a float, or each member's, (M, 1, 1):
    regexp/population/schedule.py)."""

    def __init__(self, name: str, params: List[torch.Tensor], hp: Dict[str, Sequence[float]],
                 nesterov: bool, device: torch.device, centered: bool = False, amsgrad: bool = False):
        self.name, self.nesterov, self.device = name, nesterov, device
        self.centered = centered  # RMSprop's centred variant (shared: it adds a state tensor)
        self.params = params
        self.adam = name in ("adam", "adamw")
        self.amsgrad = amsgrad and self.adam  # SAM's config has the key for any base; only Adam's reads it
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
    def step(self, factor: Factor) -> None:
        if torch.is_grad_enabled():  # the engine's hand-written step runs under no_grad already
            with torch.no_grad():
                return self.step(factor)
        grads = [p.grad for p in self.params]
        self.steps += 1
        lr = self.hp["lr"] * factor
        if self.adam:
            self._adam(grads, lr)
        elif self.name in ADAPTIVE:
            getattr(self, "_" + self.name)(grads, lr)
        else:
            self._sgd(grads, lr)

    def _sgd(self, grads: List[torch.Tensor], lr: Hyper) -> None:
        mom, damp = self.hp.get("momentum", 0.0), self.hp.get("dampening", 0.0)
        first = "momentum_buffer" not in self.state
        if self.uses_momentum() and first:
            self.state["momentum_buffer"] = [torch.empty_like(g) for g in grads]
        bufs = self.state.get("momentum_buffer", [])
        if self._fused(lr):
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
            if self.amsgrad:
                self.state["max_exp_avg_sq"] = [torch.zeros_like(p) for p in self.params]
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        vmax = self.state.get("max_exp_avg_sq", [])
        if self._fused(lr):
            torch._foreach_add_(self.state["step"], 1.0)
            kernel = torch._fused_adamw_ if self.name == "adamw" else torch._fused_adam_
            kernel(self.params, grads, m, v, vmax, self.state["step"], lr=lr, beta1=hp["beta1"],
                   beta2=hp["beta2"], weight_decay=hp["weight_decay"], eps=hp["eps"],
                   amsgrad=self.amsgrad, maximize=False)
            return
        for s in self.state["step"]:
            s.add_(1.0)
        t = self.steps
        decay = _f32(1.0 - lr * hp["weight_decay"])
        bc1, bc2 = 1.0 - hp["beta1"] ** t, 1.0 - hp["beta2"] ** t
        step_size, bc2_sqrt = _f32(lr / bc1), _f32(bc2 ** 0.5)
        for j, (p, g, ma, va) in enumerate(zip(self.params, grads, m, v)):
            if isinstance(decay, torch.Tensor) or decay != 1.0:
                p.mul_(decay)
            ma.lerp_(g, _f32(1.0 - hp["beta1"]) if isinstance(hp["beta1"], torch.Tensor)
                     else 1.0 - hp["beta1"])
            va.mul_(_f32(hp["beta2"])).addcmul_(g * _f32(1.0 - hp["beta2"]), g)
            if self.amsgrad:
                torch.maximum(vmax[j], va, out=vmax[j])
                va = vmax[j]
            denom = va.sqrt().div_(bc2_sqrt).add_(_f32(hp["eps"]))
            p.sub_(ma / denom * step_size)

    # AdaGrad, RMSprop and AdaDelta: torch's own per-element steps (the fused AdaGrad kernel, the
    # foreach RMSprop and AdaDelta, as regexp.optim builds them) on the stacked tensors when the
    # hyperparameters are shared; otherwise the same steps with per-member (M, 1, 1) values.
    def _count(self) -> None:
        if "step" not in self.state:
            self.state["step"] = [torch.zeros((), device=self.device) for _ in self.params]
        torch._foreach_add_(self.state["step"], 1.0)

    def _zeros(self, *keys: str) -> None:
        for key in keys:
            if key not in self.state:
                self.state[key] = [torch.zeros_like(p) for p in self.params]

    def _adagrad(self, grads: List[torch.Tensor], lr: Hyper) -> None:
        hp = self.hp
        if "sum" not in self.state:  # torch's initial accumulator, G_0 = initial_accumulator_value
            init = _f32(hp["initial_accumulator_value"])
            self.state["sum"] = [torch.zeros_like(p).add_(init) for p in self.params]
        self._count()
        sums = self.state["sum"]
        if self._fused(lr):
            torch._fused_adagrad_(self.params, grads, sums, self.state["step"], lr=lr, lr_decay=0.0,
                                  weight_decay=0.0, eps=hp["eps"], maximize=False)
            return
        neg, eps = _f32(-lr), _f32(hp["eps"])
        for p, g, h in zip(self.params, grads, sums):
            h.addcmul_(g, g)
            p.add_(g / h.sqrt().add_(eps) * neg)

    def _rmsprop(self, grads: List[torch.Tensor], lr: Hyper) -> None:
        hp = self.hp
        mom = hp["momentum"]
        heavy = isinstance(mom, torch.Tensor) or mom > 0
        self._zeros("square_avg", *(["momentum_buffer"] if heavy else []),
                    *(["grad_avg"] if self.centered else []))
        self._count()
        sq = self.state["square_avg"]
        if self._fused(lr):  # torch's _multi_tensor_rmsprop, line for line
            torch._foreach_mul_(sq, hp["alpha"])
            torch._foreach_addcmul_(sq, grads, grads, value=1 - hp["alpha"])
            if self.centered:
                ga = self.state["grad_avg"]
                torch._foreach_lerp_(ga, grads, 1 - hp["alpha"])
                avg = torch._foreach_addcmul(sq, ga, ga, value=-1)
                torch._foreach_sqrt_(avg)
            else:
                avg = torch._foreach_sqrt(sq)
            torch._foreach_add_(avg, hp["eps"])
            if heavy:
                bufs = self.state["momentum_buffer"]
                torch._foreach_mul_(bufs, mom)
                torch._foreach_addcdiv_(bufs, grads, avg)
                torch._foreach_add_(self.params, bufs, alpha=-lr)
            else:
                torch._foreach_addcdiv_(self.params, grads, avg, value=-lr)
            return
        alpha, keep = _f32(hp["alpha"]), _f32(1.0 - hp["alpha"])
        neg, eps = _f32(-lr), _f32(hp["eps"])
        for j, (p, g, v) in enumerate(zip(self.params, grads, sq)):
            v.mul_(alpha).addcmul_(g * keep, g)
            if self.centered:
                ga = self.state["grad_avg"][j]
                ga.lerp_(g, keep)
                avg = v.addcmul(ga, ga, value=-1).sqrt_().add_(eps)
            else:
                avg = v.sqrt().add_(eps)
            if heavy:
                buf = self.state["momentum_buffer"][j]
                buf.mul_(_f32(mom)).add_(g / avg)
                p.add_(buf * neg)
            else:
                p.add_(g / avg * neg)

    def _adadelta(self, grads: List[torch.Tensor], lr: Hyper) -> None:
        hp = self.hp
        self._zeros("square_avg", "acc_delta")
        self._count()
        sq, acc = self.state["square_avg"], self.state["acc_delta"]
        if self._fused(lr):  # torch's _multi_tensor_adadelta, line for line
            rho, eps = hp["rho"], hp["eps"]
            torch._foreach_mul_(sq, rho)
            torch._foreach_addcmul_(sq, grads, grads, value=1 - rho)
            std = torch._foreach_add(sq, eps)
            torch._foreach_sqrt_(std)
            deltas = torch._foreach_add(acc, eps)
            torch._foreach_sqrt_(deltas)
            torch._foreach_div_(deltas, std)
            torch._foreach_mul_(deltas, grads)
            torch._foreach_mul_(acc, rho)
            torch._foreach_addcmul_(acc, deltas, deltas, value=1 - rho)
            torch._foreach_add_(self.params, deltas, alpha=-lr)
            return
        rho, keep, eps, neg = _f32(hp["rho"]), _f32(1.0 - hp["rho"]), _f32(hp["eps"]), _f32(-lr)
        for p, g, v, a in zip(self.params, grads, sq, acc):
            v.mul_(rho).addcmul_(g * keep, g)
            delta = (a + eps).sqrt_().div_((v + eps).sqrt_()).mul_(g)
            a.mul_(rho).addcmul_(delta * keep, delta)
            p.add_(delta * neg)

    def member_state(self, i: int) -> List[Dict[str, torch.Tensor]]:
        """Member ``i``'s per-parameter state slices, in torch.optim's key names."""
        out: List[Dict[str, torch.Tensor]] = [dict() for _ in self.params]
        for key, ts in self.state.items():
            for d, t in zip(out, ts):
                d[key] = t.detach().clone() if key == "step" else t[i].detach()
        return out

    def lr_of(self, i: int, factor: Factor) -> float:
        lr = self.hp["lr"]
        return float((lr[i] if isinstance(lr, torch.Tensor) else lr) * factor_of(factor, i))

    def _fused(self, lr: Hyper) -> bool:
        """torch's fused kernel: every hyperparameter, the scheduled lr included, shared."""
        return self.fused and not isinstance(lr, torch.Tensor)
