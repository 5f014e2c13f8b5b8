"""Which runs a bucket trains, and which of its stacked slices each run owns.

The engine trains slices: the optimizer, the penalties, the dropout and noise draws and the
training loss are elementwise per slice. What is per run (its training-loss sums, weight norm,
evaluation, logs, best epoch, early stopping, pruning, divergence, checkpoint, final files, and
whether it stays in the bucket) goes through this map. An ordinary run owns one slice, slice i
being run i, and every map here is the identity, so such a run's numbers are the slice's own
bits. An ensemble's run owns K slices (regexp/population/ensemble.py's ``Owners``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch

if TYPE_CHECKING:
    from regexp.population.engine import Bucket
    from regexp.population.member import Member


class Runs:
    """Run i owns the slices ``i·k .. i·k + k − 1``; here k = 1."""

    k = 1

    def __init__(self, members: List["Member"]):
        self.members = list(members)

    def slices(self, i: int) -> List[int]:
        return list(range(i * self.k, (i + 1) * self.k))

    def slice_members(self) -> List["Member"]:
        """The Bucket's members, one per slice."""
        return self.members

    def attach(self, b: "Bucket") -> None:
        b.runs = self
        b.attach_probes()

    def per_run(self, t: torch.Tensor) -> torch.Tensor:
        """(S, ...) per slice → (M, ...) per run: summed over each run's slices."""
        return t

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Class-major (S, C, rows) logits → each run's prediction (M, C, rows), up to a shift."""
        return z

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """(S, N) labels → (M, N): a run's slices read the same examples."""
        return y

    def probe_forward(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The stacked eval forward (S, B, ...) → (S, B, C) as the probes measure each run: (M, B, ...)
        inputs, (M, B, C) outputs (a run's own logits)."""
        return forward

    def joint(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A training forward pass (S, B, D) → (S, B, C) as what a batch penalty differentiates:
        each run's own prediction (a slice's logits)."""
        return forward

    def state(self, b: "Bucket", i: int, tensors: Optional[List[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Run i's state_dict, as its lone model names it (``tensors``: stacked ones other than the weights)."""
        return b.net.member_state(i, tensors)

    def prefix(self, j: int) -> str:
        """The name prefix of a run's j-th slice's parameters in its lone model."""
        return ""

    def checkpointing(self, b: "Bucket", i: int, running: Optional[torch.Tensor]):
        """Around writing run i's checkpoint: what it needs beyond its slices' state."""
        return nullcontext()

    def keep(self, b: "Bucket", kept: List[int]) -> List[int]:
        """Keep the runs ``kept`` (and their slices) in the bucket; return those slices."""
        sl = [s for i in kept for s in self.slices(i)]
        b.keep(sl)
        self.members = [self.members[i] for i in kept]
        if b.probes is not None:
            b.probes.keep(kept)
        return sl
