"""Sharpness-aware minimization (Foret et al. 2021) and its adaptive form ASAM (Kwon et al. 2021).

SAM minimizes the worst loss in a ball of radius ρ around the weights, max_{‖ε‖≤ρ} L(w + ε).
To first order the maximizer is ε̂ = ρ g/‖g‖₂ (g = ∇L(w)); a step then takes the gradient at
w + ε̂ and hands it to a base optimizer, which updates w itself:

    g = ∇L(w),  ε̂ = ρ g/‖g‖,  w ← base_step(w, ∇L(w + ε̂)).

ASAM makes the ball scale-invariant with the elementwise operator T_w = |w| + η
(η keeps zero weights perturbable): ε̂ = ρ T_w² g / ‖T_w g‖ (Kwon et al. 2021, §4), applied
here to every parameter, biases included. ``perturbation`` and ``perturbed`` are shared with
the ρ-ball sharpness probe (``regexp/probes/sharpness.py``), which is one SAM ascent step.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence

import torch


def perturbation(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], rho,
                 adaptive: bool = False, eta=0.01, members: int = 1,
                 owner: Optional[torch.Tensor] = None,
                 once: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """SAM's ascent step ε̂ (ASAM's with ``adaptive``); a zero gradient gives ε̂ = 0.

    With ``members`` > 1 the parameters are M models stacked along a leading dimension
    (a population): each member's ε̂ has its own norm ‖g_m‖ (and ``rho`` and ``eta`` may be (M,)
    tensors, one radius and one η per member). A lone model is the case M = 1. ``owner`` (M,): members with one owner
    (a population's ensemble, whose K models are K members) share one norm over all of theirs.
    ``once``: per parameter None, or an (M,) 0/1 mask for a tensor whose owner's members hold equal
    copies of one tensor, with its gradient (an ensemble's one mixture): counted in the norm on the
    masked member alone, so the owner's norm counts it once, and every copy moves by its ε̂."""
    with torch.no_grad():
        g = [torch.zeros_like(p) if gr is None else gr.detach() for p, gr in zip(params, grads)]
        per = lambda p: eta.view(-1, *[1] * (p.dim() - 1)) if isinstance(eta, torch.Tensor) else eta  # noqa: E731
        t = [p.detach().abs() + per(p) for p in params] if adaptive else [None] * len(g)
        scaled = [gi if ti is None else ti * gi for gi, ti in zip(g, t)]
        norms = torch.stack([torch.linalg.vector_norm(s.reshape(members, -1), dim=1) for s in scaled])
        if once is not None:
            norms = torch.stack([n if c is None else n * c for n, c in zip(norms, once)])
        norm = torch.linalg.vector_norm(norms, dim=0)  # (M,)
        if owner is not None:
            sq = torch.zeros(int(owner.max()) + 1, device=norm.device).index_add_(0, owner, norm.pow(2))
            norm = sq.sqrt().index_select(0, owner)
        factor = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
        return [factor.reshape(-1, *([1] * (s.dim() - 1))) * (s if ti is None else ti * s)
                for s, ti in zip(scaled, t)]


@contextlib.contextmanager
def perturbed(params: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Weights moved to w + δ inside the block, then restored bit for bit (w + δ − δ would not be)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def ascended_gradient(params: Sequence[torch.Tensor], closure: Callable[[], torch.Tensor], rho,
                      adaptive: bool = False, eta=0.01, members: int = 1,
                      owner: Optional[torch.Tensor] = None, once: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """SAM's first half, shared by lone runs and populations: from ∇L(w) in ``.grad``, move to
    w + ε̂, let ``closure`` put ∇L(w + ε̂) into ``.grad``, and put the weights back to w
    exactly. The base optimizer's step follows."""
    eps = perturbation(params, [p.grad for p in params], rho, adaptive, eta, members, owner, once)
    with perturbed(params, eps), torch.enable_grad():
        return closure()


class SAM(torch.optim.Optimizer):
    """A base optimizer behind SAM's two passes; ``step(closure)`` needs the closure.

    The caller has already put ∇L(w) in ``.grad`` (as for any optimizer); the closure must zero
    the gradients, recompute the loss on the same batch and call backward. The param groups,
    state and schedule are the base optimizer's (a learning-rate schedule acts on it directly).
    """

    needs_closure = True

    def __init__(self, base: torch.optim.Optimizer, rho: float, adaptive: bool = False, eta: float = 0.01):
        self.base, self.rho, self.adaptive, self.eta = base, rho, adaptive, eta
        super().__init__([{"params": []}], {})
        self.param_groups = base.param_groups
        self.defaults = base.defaults
        self.state = base.state

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        if closure is None:
            raise RuntimeError("optimizer=sam needs step(closure), a function that recomputes the batch's "
                               "loss and gradients (two passes per step): regexp's trainer passes one, "
                               "a task with a loop of its own does not support sam")
        loss = ascended_gradient(self._params(), closure, self.rho, self.adaptive, self.eta)
        self.base.step()
        return loss

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)
