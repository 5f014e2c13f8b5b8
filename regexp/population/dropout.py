"""Per-member inverted-dropout masks for a population.

``exact`` (the CPU default) reproduces what a member would draw when trained alone: torch's
CPU dropout is ``empty_like(h).bernoulli_(1 - p) / (1 - p)`` from the global generator,
which ``train()`` seeds before building the model. Each member owns a generator holding
that state after its model was built, and draws its (B, width) masks from it in the
order of the forward pass (input site, then each hidden site), so its masks are exactly
those of the lone run. That costs one small call per member and site per step. The batched
mode (used on GPUs, where lone runs draw from the device generator anyway) draws every
member's masks in one call: the same distribution, not the same numbers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


class MemberDropout:
    def __init__(self, input_p: Sequence[float], hidden_p: Sequence[float],
                 generators: Sequence[torch.Generator], widths: Sequence[int], in_dim: int,
                 width: int, hidden_layers: int, device: torch.device, exact: bool, seed: int = 0,
                 before: Optional[Sequence[int]] = None):
        """``before``: the weight each site (the input's first, then the hidden ones) feeds, in
        the stacked model's :attr:`weights` order; None: site l feeds weight l (an MLP's, a CNN's)."""
        self.input_p, self.hidden_p = list(input_p), list(hidden_p)
        self.before = list(before) if before is not None else list(range(1 + hidden_layers))
        self.generators = list(generators)
        self.widths = list(widths)
        self.in_dim, self.width, self.hidden_layers = in_dim, width, hidden_layers
        self.device, self.exact = device, exact
        self.batched_gen = None if exact else torch.Generator(device=device).manual_seed(seed)
        self._keep_probs()

    def _keep_probs(self) -> None:
        # Batched mode: 1 - p per member and site, made once, not per step (no host copies).
        as_t = lambda ps: torch.tensor([1.0 - p for p in ps], device=self.device).view(-1, 1, 1)  # noqa: E731
        self.keep_input, self.keep_hidden = as_t(self.input_p), as_t(self.hidden_p)

    @property
    def active(self) -> bool:
        return any(p > 0 for p in self.input_p + self.hidden_p)

    def keep(self, idx: Sequence[int]) -> None:
        for name in ("input_p", "hidden_p", "generators", "widths"):
            setattr(self, name, [getattr(self, name)[i] for i in idx])
        self._keep_probs()

    def masks(self, batch: int) -> List[Optional[torch.Tensor]]:
        """[input mask, hidden mask of layer 0, ...]; None where no member drops anything."""
        return [self.site_mask(l, batch) for l in range(1 + self.hidden_layers)]

    def site_mask(self, l: int, batch: int) -> Optional[torch.Tensor]:
        """The mask of dropout site ``l`` (0: the network's input), or None."""
        if not any(p > 0 for p in (self.input_p if l == 0 else self.hidden_p)):
            return None  # sizes unread: a stacked CNN's or Transformer's sites are not the MLP's
        if l == 0:
            ps, keep, ws, full = self.input_p, self.keep_input, [self.in_dim] * len(self.widths), self.in_dim
        else:  # a width per member (and bucket), or per member and hidden layer (model.widths)
            at = lambda w: w[l - 1] if isinstance(w, (list, tuple)) else w  # noqa: E731
            ps, keep, ws, full = self.hidden_p, self.keep_hidden, [at(w) for w in self.widths], at(self.width)
        return self._site(ps, keep, ws, full, batch)

    def _site(self, ps: List[float], keep: torch.Tensor, ws: List[int], full: int, batch: int) -> torch.Tensor:
        if not self.exact:
            u = torch.rand(len(ps), batch, full, generator=self.batched_gen, device=self.device)
            return (u < keep).float() / keep
        mask = torch.ones(len(ps), batch, full)
        for i, (p, w, g) in enumerate(zip(ps, ws, self.generators)):
            if p > 0:
                mask[i, :, :w] = torch.empty(batch, w).bernoulli_(1.0 - p, generator=g).div_(1.0 - p)
        return mask.to(self.device)
