"""The probe interface and its registry (``probe=[hessian,sharpness]``).

A probe measures the model without changing it: the trainer calls ``measure`` every
``probe.every`` epochs and once at the end of a completed run, with the model in eval mode
(dropout off, batch norm on its running statistics), on a fixed probe batch of the training
set, and a generator of the probe's own (the run's global generators are never touched, so
the run trains exactly as without probes). After the last measurement ``figures`` may draw
what it saw.

To add one: a subclass of :class:`Probe` with a ``Config`` dataclass and ``@register``, a
field of that name in :class:`regexp.config.ProbeConfig`, and ``configs/probe/<name>.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

PROBES: Dict[str, Type["Probe"]] = {}


def register(cls: Type["Probe"]) -> Type["Probe"]:
    PROBES[cls.name] = cls
    return cls


@dataclass
class ProbeInputs:
    """What a measurement sees: the model, its trainable parameters, the probe batch (``x``,
    ``y``) and the whole training set (``x_train``, ``y_train``), with the batch size for
    forward passes over the latter."""
    model: nn.Module
    params: List[torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    eval_batch_size: int

    def loss_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The data term alone (mean cross-entropy): penalties and label smoothing are the
        training objective's, not the loss landscape every probe describes."""
        return F.cross_entropy(self.model(x), y)

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

    def measure(self, inputs: ProbeInputs, generator: torch.Generator) -> Dict[str, float]:
        raise NotImplementedError

    def figures(self, epoch: int) -> Dict[str, Any]:
        """Matplotlib figures of the last measurement, by name (``<name>.png`` in the run folder)."""
        return {}
