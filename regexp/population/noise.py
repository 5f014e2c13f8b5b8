"""Everything random a lone run draws in one training step, drawn per member in its order.

A member's MLP step draws from its own generator, in this order: Gaussian input noise
(``input_noise``, before the forward pass), then for each linear layer
the dropout mask of its input (``dropout``) and its weight transforms (``weight_noise``'s
noise, ``dropconnect``'s mask, drawn as the layer runs, in the order they were attached).
Each member's generator (see :mod:`regexp.population.dropout`) draws the same numbers in the
same order, so with ``exact`` a member sees exactly its lone run's perturbations; padded
units get none (their weights stay exactly zero). The batched mode (GPU) draws each kind for
all members in one call: same distribution, other numbers. Augmentation and FGSM, batch
transforms like input noise (the three in config order), are in :mod:`regexp.population.transforms`.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from regexp.population.dropout import MemberDropout
from regexp.regularizers.dropconnect import connect_mask, connected


# A member's lone weight inside its stacked slice: (rows, cols) of its top-left corner, or the
# positions (LongTensors) its rows and columns take (a Transformer's head-by-head embedding).
Block = Tuple[Union[int, torch.Tensor], Union[int, torch.Tensor]]


def _size(block: Block) -> Tuple[int, int]:
    return tuple(v if isinstance(v, int) else len(v) for v in block)


def _place_(out: torch.Tensor, block: Block, values: torch.Tensor) -> None:
    """Write a member's lone-shaped ``values`` into its slice ``out`` at ``block``."""
    r, c = block
    if isinstance(r, int) and isinstance(c, int):
        out[:r, :c] = values
        return
    rows = torch.arange(r) if isinstance(r, int) else r
    cols = torch.arange(c) if isinstance(c, int) else c
    out[rows[:, None], cols[None, :]] = values


class StepNoise:
    def __init__(self, drop: MemberDropout, input_sigma: Optional[Sequence[float]],
                 weight_sigma: Optional[Sequence[float]], noised_layers: Sequence[bool], device: torch.device,
                 connect_p: Optional[Sequence[float]] = None, connected_layers: Sequence[bool] = (),
                 connect_first: bool = False,
                 corners: Optional[Callable[[], List[List[Tuple[int, int]]]]] = None):
        """``input_sigma`` / ``weight_sigma`` / ``connect_p`` (DropConnect's p): one value per
        member, or None when the population has no such regularizer (σ = 0 or p = 0 still draws,
        as a lone run does); ``noised_layers`` / ``connected_layers``: which linear layers weight
        noise / DropConnect perturb (the head only with ``include_head``); ``connect_first``:
        DropConnect was attached before weight noise (listed first among the regularizers);
        ``corners``: per weight, each member's :data:`Block`, read at every draw (a CNN's:
        :meth:`StackedCNN.weight_corners`); None: an MLP's, from its widths."""
        self.drop, self.device = drop, device
        self.input_sigma = list(input_sigma) if input_sigma is not None else None
        self.weight_sigma = list(weight_sigma) if weight_sigma is not None else None
        self.noised = list(noised_layers) if weight_sigma is not None else [False] * len(noised_layers)
        self.connect_p = list(connect_p) if connect_p is not None else None
        self.connects = (list(connected_layers) if connect_p is not None else []) or [False] * len(noised_layers)
        self.transforms = ("connect", "noise") if connect_first else ("noise", "connect")
        self.corners = corners
        self._masks = {}
        self._scales()

    def _scales(self) -> None:
        as_t = lambda v: torch.tensor(v, device=self.device).view(-1, 1, 1)  # noqa: E731 (float32, as torch uses σ)
        self.s_in = as_t(self.input_sigma) if self.input_sigma is not None else None
        self.s_w = as_t(self.weight_sigma) if self.weight_sigma is not None else None
        self.keep_c = as_t([1.0 - p for p in self.connect_p]) if self.connect_p is not None else None

    @property
    def active(self) -> bool:
        """Whether a step draws anything besides dropout masks."""
        return self.input_sigma is not None or any(self.noised) or any(self.connects)

    def keep(self, idx: Sequence[int]) -> None:
        """Keep members ``idx`` (the dropout part is kept by its owner)."""
        for name in ("input_sigma", "weight_sigma", "connect_p"):
            if getattr(self, name) is not None:
                setattr(self, name, [getattr(self, name)[i] for i in idx])
        self._scales()

    def draw(self, x: torch.Tensor, weights: List[torch.Tensor], widths: List[int]
             ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]], List[torch.Tensor]]:
        """(noisy inputs (M, B, D), dropout masks per layer input, the weights to compute with);
        ``widths``: each member's hidden width, or its list of them (model.widths)."""
        if self.input_sigma is not None:
            x = self.noisy_input(x)
        return (x, *self.forward_draws(x.shape[1], weights, widths))

    def noisy_input(self, x: torch.Tensor) -> torch.Tensor:
        """``input_noise`` on inputs (M, B, D), each member its own σ."""
        return x + self.s_in * self._normal(x.shape, [(x.shape[1], x.shape[2])] * x.shape[0])

    def forward_draws(self, batch: int, weights: List[torch.Tensor], widths: List[int]
                      ) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]:
        """What one training forward pass of ``batch`` examples draws (the step's, FGSM's, SAM's
        second, a batch penalty's extra one: each draws its own, as in a lone run): (dropout
        masks per layer input, the weights to compute with, perturbed from ``weights`` as they
        are now); ``widths``: each member's hidden width, or its list of them (model.widths)."""
        last = len(weights) - 1
        ks = [k if isinstance(k, (list, tuple)) else [k] * last for k in widths]
        masks, used = [], list(weights)
        corners = self.corners() if self.corners is not None and (any(self.noised) or any(self.connects)) else None
        for l, w in enumerate(weights):
            if l in self.drop.before:  # a dropout site feeds this weight: its mask first, as a lone pass draws
                masks.append(self.drop.site_mask(len(masks), batch))
            if not (self.noised[l] or self.connects[l]):
                continue  # nothing drawn on this weight (sizes unread: a CNN's or Transformer's are not the MLP's)
            real = (corners[l] if corners is not None else
                    [(w.shape[1] if l == last else k[l], w.shape[2] if l == 0 else k[l - 1]) for k in ks])
            for kind in self.transforms:
                if kind == "noise" and self.noised[l]:
                    used[l] = used[l] + self.s_w * self._normal(w.shape, real)
                elif kind == "connect" and self.connects[l]:
                    used[l] = connected(used[l], self._mask(w.shape, real), self.keep_c)
        return masks, used

    def _mask(self, shape: torch.Size, real: List[Block]) -> torch.Tensor:
        """(M, rows, cols) DropConnect masks, each member's drawn on its real (rows, cols) with
        its own keep probability (padded weights are zero: whatever multiplies them is moot)."""
        if not self.drop.exact:
            u = torch.rand(shape, generator=self.drop.batched_gen, device=self.device)
            return (u < self.keep_c).float()
        out = torch.ones(shape)
        for i, (block, g, p) in enumerate(zip(real, self.drop.generators, self.connect_p)):
            _place_(out[i], block, connect_mask(torch.empty(_size(block)), 1.0 - p, g))
        return out.to(self.device)

    def _normal(self, shape: torch.Size, real: List[Block]) -> torch.Tensor:
        """(M, rows, cols) standard normal draws on each member's real block, zero elsewhere."""
        if not self.drop.exact:
            key = (tuple(shape), tuple(tuple(v if isinstance(v, int) else tuple(v.tolist()) for v in b) for b in real))
            if key not in self._masks:  # made once per shape, not per step
                mask = torch.zeros(shape)
                for i, block in enumerate(real):
                    _place_(mask[i], block, 1.0)
                self._masks[key] = mask.to(self.device)
            return torch.randn(shape, generator=self.drop.batched_gen, device=self.device) * self._masks[key]
        out = torch.zeros(shape)
        for i, (block, g) in enumerate(zip(real, self.drop.generators)):
            _place_(out[i], block, torch.randn(_size(block), generator=g))
        return out.to(self.device)
