"""``masked_reconstruction`` in a population: each member's masked segments and its data loss.

Each member draws its segment starts (``segment_mask``) from its own generator (the one its
dropout masks and noise come from, :mod:`regexp.population.dropout`) before the forward pass,
so a member's segments do not depend on the other members. The data loss is
the regularizer's own ``masked_mse``, per member.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from regexp.regularizers.masked_reconstruction import hide, masked_mse, segment_mask


class MemberPretext:
    def __init__(self, segment: int, fill: Sequence[float], generators: Sequence[torch.Generator],
                 input_shape: Tuple[int, ...], device: torch.device):
        self.segment = segment
        self.fill = list(fill)  # each member's value written over its hidden positions
        self.generators = list(generators)
        self.input_shape, self.device = tuple(input_shape), device
        self.target: Optional[torch.Tensor] = None
        self.mask: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, members: List, input_shape: Tuple[int, ...], device: torch.device) -> Optional["MemberPretext"]:
        """The members' pretext task, or None when they have none (the segment is shared)."""
        c = members[0].cfg.regularizer.get("masked_reconstruction")
        if c is None:
            return None
        fill = [float(m.cfg.regularizer["masked_reconstruction"].fill) for m in members]
        return cls(int(c.segment), fill, [m.dropout_gen for m in members], input_shape, device)

    def keep(self, idx: Sequence[int]) -> None:
        self.generators = [self.generators[i] for i in idx]
        self.fill = [self.fill[i] for i in idx]

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs (M, B, D) with each example's segment hidden; the step's targets and masks
        are kept for :meth:`loss`."""
        m, b, _ = x.shape
        self.target = x.view(m, b, *self.input_shape)
        length = self.input_shape[-1]
        self.mask = torch.stack([segment_mask(b, length, self.segment, g) for g in self.generators]).to(self.device)
        if all(f == self.fill[0] for f in self.fill):
            return hide(self.target, self.mask, self.fill[0]).view(m, b, -1)
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(m, *[1] * (self.target.dim() - 1))
        return torch.where(self.mask.unsqueeze(-2), fill, self.target).view(m, b, -1)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Each member's masked MSE of its reconstruction (M, B, C·L) of this step's targets, (M,)."""
        return masked_mse(logits.float(), self.target, self.mask, True)
