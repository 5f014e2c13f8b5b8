"""The probe interface and its registry (``probe=[hessian,sharpness]``).

A probe measures the model without changing it: the trainer calls ``measure`` every
``probe.every`` epochs and once at the end of a completed run, with the model in eval mode
(dropout off, batch norm on its running statistics), on a fixed probe batch of the training
set, and a generator of the probe's own (the run's global generators are never touched, so
the run trains exactly as without probes). After the last measurement ``figures`` may draw
what it saw.

A measurement covers M >= 1 models at once along a *member axis*: a lone run is a population
of one, and a population's members (stacked parameters, a leading member dimension on every
tensor, padded units masked out) are measured with batched products. ``measure`` returns one
dict per member; every dot product, norm and random draw is the member's own, and the draws of
member m come from its own generator in its lone run's order, so a member measures what its
lone run measures (up to float32 rounding of the batched products).

To add one: a subclass of :class:`Probe` with a ``Config`` dataclass and ``@register``, a
field of that name in :class:`regexp.config.ProbeConfig`, and ``configs/probe/<name>.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F

PROBES: Dict[str, Type["Probe"]] = {}


def register(cls: Type["Probe"]) -> Type["Probe"]:
    PROBES[cls.name] = cls
    return cls


class MemberAxis:
    """How flat parameter vectors split into members: (M, P) rows, member m's real entries
    marked by ``mask[m]``, laid out parameter by parameter in each parameter's row-major
    order. The real entries of a padded (out, in) slice in that order are the unpadded
    weight's own row-major order, so a member's row restricted to its mask is its lone run's
    flat vector.

    ``params`` carry a leading member dimension (a population), or none (a lone model, M = 1):
    ``reshape(M, -1)`` is the same for both. ``masks[i]`` (bool, ``params[i]``'s shape) marks
    real entries; None: all are real.

    ``k`` > 1: each member is K stacked slices (a population's ensemble, leading dimension M·K)
    that a probe sees as one model, the lone :class:`Ensemble` whose parameter vector lists model
    0's parameters, then model 1's ... A flat row here stays parameter by parameter (each
    parameter's K slices side by side), which every dot product and norm ignores; only the random
    draws follow the lone order (:meth:`rows`, :meth:`randn`), so a member draws what its lone
    run draws."""

    def __init__(self, params: Sequence[torch.Tensor], members: int = 1,
                 masks: Optional[Sequence[Optional[torch.Tensor]]] = None, k: int = 1):
        self.params, self.members, self.k = list(params), members, k
        self.sizes = [p.numel() // members for p in self.params]
        device = self.params[0].device
        self.masks = [None if masks is None or mk is None else mk.reshape(members, -1).to(device)
                      for mk in (masks if masks is not None else [None] * len(self.params))]
        self.padded = any(mk is not None for mk in self.masks)
        self.mask = torch.cat([torch.ones(members, s, dtype=torch.bool, device=device) if mk is None else mk
                               for s, mk in zip(self.sizes, self.masks)], 1)
        self.dims = self.mask.sum(1).tolist()
        # the lone order's positions in a row: model j's parameter i is the j-th of parameter i's K blocks
        starts = [0] + torch.tensor(self.sizes).cumsum(0).tolist()[:-1]
        self.order = None if k == 1 else torch.cat([
            torch.arange(o + j * (s // k), o + (j + 1) * (s // k)) for j in range(k)
            for o, s in zip(starts, self.sizes)]).to(device)

    def flat(self, tensors: Sequence[Optional[torch.Tensor]], dtype=None) -> torch.Tensor:
        """(M, P): each member's slices of ``tensors`` (params' shapes; None: zeros) side by side."""
        rows = [torch.zeros(self.members, s, device=self.mask.device) if t is None else t.reshape(self.members, -1)
                for s, t in zip(self.sizes, tensors)]
        out = torch.cat(rows, 1)
        return out if dtype is None else out.to(dtype)

    def unflat(self, v: torch.Tensor) -> List[torch.Tensor]:
        return [c.reshape(p.shape) for c, p in zip(v.split(self.sizes, 1), self.params)]

    def per_member(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(M,) values shaped to broadcast over a parameter (one value per member slice)."""
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def rows(self, draw: Callable[[int, torch.Generator], torch.Tensor],
             generators: Sequence[torch.Generator]) -> torch.Tensor:
        """(M, P) float64 with member m's real entries ``draw(dims[m], generators[m])``, zeros elsewhere."""
        out = torch.zeros(self.members, self.mask.shape[1], dtype=torch.float64, device=self.mask.device)
        mask = self.mask if self.order is None else self.mask[:, self.order]
        for m, g in enumerate(generators):
            if self.padded:
                out[m, mask[m]] = draw(self.dims[m], g).to(out.device)
            else:
                out[m] = draw(self.dims[m], g)
        if self.order is not None:
            out[:, self.order] = out.clone()
        return out

    def randn(self, sigma: float, generators: Sequence[torch.Generator]) -> List[torch.Tensor]:
        """σz per parameter, z ~ N(0, I) on the real entries: member m draws parameter by
        parameter, each its real entries in order, from ``generators[m]`` (as its lone run does;
        with K slices, model by model, each parameter by parameter)."""
        out = [torch.zeros_like(p) for p in self.params]
        for m, g in enumerate(generators):
            for j in range(self.k):
                for z, s, mk in zip(out, self.sizes, self.masks):
                    part = slice(j * (s // self.k), (j + 1) * (s // self.k))
                    row, real = z.view(self.members, -1)[m, part], None if mk is None else mk[m, part]
                    n = row.numel() if real is None else int(real.sum())
                    vals = (sigma * torch.randn(n, generator=g, dtype=z.dtype)).to(z.device)
                    if real is None:
                        row.copy_(vals)
                    else:
                        row[real] = vals
        return out


@dataclass
class ProbeInputs:
    """What a measurement sees: the model(s), their trainable parameters, the probe batch (``x``,
    ``y``) and the whole training set (``x_train``, ``y_train``), with the batch size for
    forward passes over the latter.

    A population (``batched``): ``model`` maps (M, B, ...) inputs to (M, B, C) logits, every
    parameter and data tensor has a leading member dimension, ``masks`` mark the real entries
    of padded members and ``is_weight`` which parameters are weight matrices. With ``k`` > 1 the
    parameters' leading dimension is M·K: member m's K slices (an ensemble's models) are one model
    to the probes, whose ``model`` gives the ensemble's prediction."""
    model: Callable[[torch.Tensor], torch.Tensor]
    params: List[torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    eval_batch_size: int
    members: int = 1
    batched: bool = False
    masks: Optional[List[Optional[torch.Tensor]]] = None
    is_weight: Optional[List[bool]] = None
    k: int = 1  # each member's stacked slices, seen as one model (a population's ensemble of K)

    def __post_init__(self):
        self.axis = MemberAxis(self.params, self.members, self.masks, self.k)
        if self.is_weight is None:
            self.is_weight = [p.dim() >= 2 for p in self.params]

    def loss_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's data term alone (mean cross-entropy), (M,): penalties and label
        smoothing are the training objective's, not the loss landscape every probe describes."""
        if not self.batched:
            return F.cross_entropy(self.model(x), y).reshape(1)
        logits = self.model(x)
        m, b, c = logits.shape
        return F.cross_entropy(logits.reshape(m * b, c), y.reshape(-1), reduction="none").view(m, b).mean(1)

    def loss(self) -> torch.Tensor:
        return self.loss_of(self.x, self.y)


class Probe:
    name: ClassVar[str]
    Config: ClassVar[type]
    ranges: ClassVar[Dict[str, Tuple[Callable[[Any], bool], str]]] = {}

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg, prefix: str) -> None:
        from regexp.config import check_ranges

        check_ranges(cls.ranges, cfg, prefix)

    def measure(self, inputs: ProbeInputs, generators: Sequence[torch.Generator]) -> List[Dict[str, float]]:
        """One dict of values per member; member m draws only from ``generators[m]``."""
        raise NotImplementedError

    def figures(self, epoch: int, member: int = 0) -> Dict[str, Any]:
        """Figures of a member's last measurement, by name (``<name>.png`` in its run folder):
        matplotlib figures, or RGB images (H, W, 3, uint8) the probe rendered itself."""
        return {}
