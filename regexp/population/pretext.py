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
    def __init__(self, segment: int, fill: float, generators: Sequence[torch.Generator],
                 input_shape: Tuple[int, ...], device: torch.device):
        self.segment, self.fill = segment, fill
        self.generators = list(generators)
        self.input_shape, self.device = tuple(input_shape), device
        self.target: Optional[torch.Tensor] = None
        self.mask: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, members: List, input_shape: Tuple[int, ...], device: torch.device) -> Optional["MemberPretext"]:
        """The members' pretext task, or None when they have none (segment and fill are shared)."""
        c = members[0].cfg.regularizer.get("masked_reconstruction")
        if c is None:
            return None
        return cls(int(c.segment), float(c.fill), [m.dropout_gen for m in members], input_shape, device)

    def keep(self, idx: Sequence[int]) -> None:
        self.generators = [self.generators[i] for i in idx]

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs (M, B, D) with each example's segment hidden; the step's targets and masks
        are kept for :meth:`loss`."""
        m, b, _ = x.shape
        self.target = x.view(m, b, *self.input_shape)
        length = self.input_shape[-1]
        self.mask = torch.stack([segment_mask(b, length, self.segment, g) for g in self.generators]).to(self.device)
        return hide(self.target, self.mask, self.fill).view(m, b, -1)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Each member's masked MSE of its reconstruction (M, B, C·L) of this step's targets, (M,)."""
        return masked_mse(logits.float(), self.target, self.mask, True)
