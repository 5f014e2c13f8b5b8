"""The regularizer interface and its registry.

Every run trains in the population engine (regexp/population/engine.py; a lone run is a
population of one), which computes every member's step at once on stacked weights (leading
dimension: the member). A regularizer is written as its config, the formulas that step calls,
and the per-member hooks the engine calls on each member's own instance with the member's lone
model (built as a lone run builds it; the engine copies the member's stacked slice into it
before its logs, its report and its checkpoints):

- ``Config`` (a dataclass) and ``ranges`` (key -> (predicate, description), checked by
  ``validate``, which a regularizer may extend for checks across keys).
- ``wrap_model(model)``: replace the lone model before anything else sees it (an ensemble puts
  K members behind one module, masked_reconstruction replaces the head); returns the model.
- ``attach(model)``: change the lone model once, before training (dropout sets its sites, an
  activity penalty refuses a model without hidden units, multi_task builds its head).
- ``param_groups()``: its own learned parameters, as optimizer groups with their own lr.
- ``penalty_of(params, hp, stacked)`` (classmethod): a term added to the loss that depends on
  the weights alone (norm penalties, priors), logged as ``penalty/<name>``. The engine passes
  the stacked trainable weights (the biases and norm parameters too only when the config has
  ``exclude_bias_and_norm: false``) and ``hp``, the config's values, each float whose key
  compat.MEMBER_KEYS lets members differ in as an (M,) tensor; it returns one value per member.
  ``stacked=False`` is the same formula on one model's tensors (0-dim).
- ``population_hp(regs, named, stack)`` (classmethod, optional): what ``penalty_of`` needs
  beyond the config's numbers (parameter tying's reference tensors), from the members' attached
  instances ``regs``, the (name, stacked tensor) pairs ``penalty_of`` gets and
  ``stack(per_member_tensors, like)``, which pads each member's tensor into ``like``'s shape.
- ``activity_of(hs, hp, stacked, units)``: the same for a penalty on the hidden activations
  ``hs`` the stacked forward recorded (regexp/regularizers/activity.py).
- ``batch_penalty_of(batch, hp, stacked)`` (classmethod): the same for a term that needs the
  training batch and its data loss (a penalty on the loss's gradient differentiates the loss),
  on a :class:`Batch`.
- ``epoch_end(model, row)``: after each evaluation, with that epoch's metrics; return True
  to stop training (early stopping). Set ``restores_best = True`` to have the best-validation
  weights loaded back before the final evaluation.
- ``report(model, tensors, evaluate)``: extra numbers for ``metrics.json``'s ``extra`` after
  training (MC-dropout accuracy, accuracy on FGSM inputs, after quantization ...).
- ``log(writer, epoch)``: anything worth a TensorBoard plot; ``state_dict()`` /
  ``load_state_dict()``: state a checkpoint must carry.

A loss term defined through one of the three ``*_of`` formulas is picked up by the engine's
``LossTerms`` (``penalizes()``). What a regularizer does to the batch (input noise,
augmentation, FGSM), to the data loss (label smoothing, an ensemble's bootstrap weights, a
pretext loss), to the forward pass (dropout, weight noise, DropConnect) or to the update
(decoupled weight decay) is stacked code in regexp/population/ that calls functions written
once in the regularizer's module (``augment``, ``fgsm``, ``shrink_`` ...); which regularizers
and models a population accepts is listed in regexp/population/compat.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn


REGULARIZERS: Dict[str, Type["Regularizer"]] = {}


def register(cls: Type["Regularizer"]) -> Type["Regularizer"]:
    REGULARIZERS[cls.name] = cls
    return cls


@dataclass
class Context:
    """What a regularizer may need to know about the run it joins.

    ``optimizer``: a member has no torch optimizer; the engine sets a stand-in whose
    ``param_groups[0]["lr"]`` is the member's current learning rate (decoupled decay logs it).
    ``seed`` is the run's seed, for regularizers that draw their own random numbers.
    """
    num_classes: int
    n_train: int
    device: torch.device
    input_shape: Tuple[int, ...] = ()
    seed: int = 0
    out_dir: Optional[object] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    model_cfg: Optional[Any] = None  # cfg.model, for regularizers that build more models
    data: Optional[Any] = None  # the run's Dataset, for regularizers that need more per-example targets
    data_cfg: Optional[Any] = None  # cfg.data, where that data came from


@dataclass
class Batch:
    """A training step as a batch penalty sees it, alone or stacked (leading dim: the member).

    ``x``: the step's inputs after its batch transforms (stacked: (M, B, D), flattened; lone:
    (B, *input_shape)); ``loss``: their data loss (0-dim or (M,)); ``forward``: inputs ->
    logits, a fresh training-mode pass that draws its own dropout masks, as calling the model
    again does; ``data_loss``: (logits, y) -> the run's cross-entropy (label smoothing
    included); ``params``: every trainable parameter."""
    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor]
    data_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: List[torch.Tensor]
    input_shape: Tuple[int, ...]


class Regularizer:
    name: ClassVar[str]
    Config: ClassVar[type]
    # key -> (predicate, description of valid values); checked by ``validate``.
    ranges: ClassVar[Dict[str, Tuple[Callable[[Any], bool], str]]] = {}
    restores_best: bool = False
    # The validation metric that picks the "best" epoch (val_acc by default); None: no opinion.
    selects_best_by: Optional[str] = None
    # classmethod penalty_of(params, hp, stacked) -> Tensor, for weight penalties (see above)
    penalty_of: ClassVar[Optional[Callable]] = None
    # classmethod population_hp(regs, named, stack) -> Dict, for penalty_of in a population (see above)
    population_hp: ClassVar[Optional[Callable]] = None
    # activity_of(hs, hp, stacked, units) -> Tensor, for activation penalties (see above)
    activity_of: ClassVar[Optional[Callable]] = None
    # classmethod batch_penalty_of(batch, hp, stacked) -> Tensor, for batch penalties (see above)
    batch_penalty_of: ClassVar[Optional[Callable]] = None

    def __init__(self, cfg, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def validate(cls, cfg, prefix: str) -> None:
        from regexp.config import check_ranges

        check_ranges(cls.ranges, cfg, prefix)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def attach(self, model: nn.Module) -> None:
        pass

    def param_groups(self) -> List[dict]:
        return []

    @classmethod
    def penalizes(cls) -> bool:
        """Whether it adds a loss term (and a ``penalty/<name>`` curve): through its
        ``penalty_of``, ``activity_of`` or ``batch_penalty_of``."""
        return cls.penalty_of is not None or cls.activity_of is not None or cls.batch_penalty_of is not None

    def epoch_end(self, model: nn.Module, row: Dict[str, float]) -> bool:
        return False

    def report(self, model: nn.Module, tensors: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
               evaluate: Callable) -> Dict[str, float]:
        return {}

    def log(self, writer, epoch: int) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def build_regularizers(cfg, ctx: Context) -> List[Regularizer]:
    return [REGULARIZERS[name](rcfg, ctx) for name, rcfg in cfg.items()]


def member_sum(t: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Σ of a parameter's entries: all of them for a lone model's tensor (0-dim), each member's
    for a population's stacked tensor, whose leading dimension is the member ((M,))."""
    return t.sum(dim=tuple(range(1, t.dim()))) if stacked else t.sum()


def per_member(v, stacked: bool, dims: int):
    """A hyperparameter shaped to broadcast against a tensor of ``dims`` dimensions whose
    leading one is the member (stacked: ``v`` is (M,)); a lone run's number as it is."""
    return v.view(-1, *([1] * (dims - 1))) if stacked else v
