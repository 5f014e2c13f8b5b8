"""Each member's learning-rate factor at a step, from its own ``scheduler`` values.

A lone run's ``LambdaLR`` multiplies every group's initial lr by ``lr_factor(cfg, total)(t)``
(regexp/optim/schedulers.py). Members of one population share the scheduler's name and the
total number of steps, but may differ in its values (``gamma``, ``warmup_steps`` ...): then the
factor is an (M, 1, 1) float64 tensor, each member's own, which multiplies the (float64)
per-member lrs the way a per-member lr does (regexp/population/optim.py), and the product is
rounded to float32 once, as torch rounds its Python-float lr. When all members share their
values the factor stays a Python float, so the update keeps torch's fused kernels.

The factors of every step are computed once per distinct schedule (a config read per call
would cost more than the step) and read by index, on the device, with no host sync.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, List, Sequence, Union

import torch
from omegaconf import OmegaConf

from regexp.optim import lr_factor

Factor = Union[float, torch.Tensor]


class Schedule:
    """``schedule(step)``: the members' lr factor at ``step`` (float or (M, 1, 1) tensor)."""

    def __init__(self, sched_cfgs: Sequence, total: int, device: torch.device):
        plain = [OmegaConf.to_container(c, resolve=True) for c in sched_cfgs]
        distinct: List[dict] = []
        for p in plain:
            if p not in distinct:
                distinct.append(p)
        self.total = total
        self.fs: List[Callable[[int], float]] = [lr_factor(SimpleNamespace(**p), total) for p in distinct]
        # member -> its schedule's column
        self.which = torch.tensor([distinct.index(p) for p in plain], dtype=torch.long, device=device)
        if len(self.fs) == 1:
            self.table = [self.fs[0](i) for i in range(total + 1)]
        else:
            self.table = torch.tensor([[f(i) for f in self.fs] for i in range(total + 1)],
                                      dtype=torch.float64, device=device)

    @property
    def shared(self) -> bool:
        return len(self.fs) == 1

    def __call__(self, step: int) -> Factor:
        if self.shared:
            return self.table[step] if 0 <= step <= self.total else self.fs[0](step)
        row = (self.table[step] if 0 <= step <= self.total
               else torch.tensor([f(step) for f in self.fs], dtype=torch.float64, device=self.which.device))
        return row.index_select(0, self.which).view(-1, 1, 1)

    def member(self, i: int, step: int) -> float:
        """Member i's factor at ``step``, as its lone run's scheduler computes it."""
        return self.fs[int(self.which[i])](step)

    def keep(self, idx: torch.Tensor) -> None:
        """Only the members ``idx`` go on (as Bucket.keep)."""
        self.which = self.which.index_select(0, idx.to(self.which.device))


def factor_of(factor: Factor, i: int) -> float:
    """Member i's value of a factor :class:`Schedule` returned."""
    return float(factor[i]) if isinstance(factor, torch.Tensor) else factor
