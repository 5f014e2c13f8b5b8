"""The regularizer interface and its registry.

A regularizer may act at any of these points of a training step; each hook has a no-op
default, so a regularizer overrides only what it changes:

- ``wrap_model(model)``: replace the model before anything else sees it (an ensemble puts K
  members behind one module); returns the model to train.
- ``attach(model)``: change the model once, before training (dropout sets its sites).
- ``param_groups()``: its own learned parameters, as optimizer groups with their own lr.
- ``transform_batch(x, y, model)``: the training batch (input noise, augmentation, FGSM).
- ``loss_kwargs()``: arguments of the cross-entropy (label smoothing).
- ``data_loss(model, logits, y, idx, loss_kwargs)``: replace the cross-entropy of the batch
  (``idx``: the batch's positions in the training set), e.g. per-member bootstrap-weighted
  losses of an ensemble; None keeps the ordinary cross-entropy.
- ``penalty(model)``: a term added to the loss (norm penalties, priors); logged as
  ``penalty/<name>``.
- ``penalty_of(params, hp, stacked)`` (classmethod, optional): a penalty on the weights alone,
  written once for both engines: ``penalty(model)`` calls it on the model's weights with the
  config's values, the population engine on its stacked weights (leading dimension: the
  member) with an (M,) tensor per numeric key, and gets one value per member.
- ``population_hp(regs, named, stack)`` (classmethod, optional): what ``penalty_of`` needs for
  stacked weights beyond the config's numbers (parameter tying's reference tensors), from the
  members' attached instances ``regs``, the (name, stacked tensor) pairs ``penalty_of`` gets and
  ``stack(per_member_tensors, like)``, which pads each member's tensor into ``like``'s shape.
- ``activity_of(hs, hp, stacked, units)`` (optional): the same for a penalty on the hidden
  activations ``hs`` (regexp/regularizers/activity.py).
- ``batch_penalty(model, loss, x, y, loss_kwargs)``: the same, for a term that needs the
  training batch and its data loss (a penalty on the loss's gradient differentiates the
  loss); by default the ``penalty(model)`` above.
- ``batch_penalty_of(batch, hp, stacked)`` (classmethod, optional): such a term written once
  for both engines, on a :class:`Batch` (the batch, its data loss, a fresh forward pass and
  the parameters): ``batch_penalty`` calls it on the model, the population engine on its
  stacked network ((M,) values, one per member).
- ``before_step(model)``: after backward and gradient clipping, right before the optimizer
  step (decoupled weight decay shrinks the weights there, as AdamW does).
- ``after_step(model)``: after each optimizer step.
- ``epoch_end(model, row)``: after each evaluation, with that epoch's metrics; return True
  to stop training (early stopping). Set ``restores_best = True`` to have the trainer load
  the best-validation weights back before the final evaluation.
- ``report(model, tensors, evaluate)``: extra numbers for ``metrics.json``'s ``extra`` after
  training (MC-dropout accuracy, accuracy on FGSM inputs, after quantization ...).
- ``log(writer, epoch)``: anything worth a TensorBoard plot; ``state_dict()`` /
  ``load_state_dict()``: state a checkpoint must carry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F


REGULARIZERS: Dict[str, Type["Regularizer"]] = {}


def register(cls: Type["Regularizer"]) -> Type["Regularizer"]:
    REGULARIZERS[cls.name] = cls
    return cls


@dataclass
class Context:
    """What a regularizer may need to know about the run it joins.

    ``optimizer`` is set by the trainer once it exists (after ``attach`` and
    ``param_groups``), for regularizers that act in the update, such as decoupled decay.
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

    ``x``: the step's inputs after ``transform_batch`` (lone: (B, *input_shape); stacked:
    (M, B, D), flattened); ``loss``: their data loss (0-dim or (M,)); ``forward``: inputs ->
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

    @classmethod
    def of_model(cls, model: nn.Module, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 loss_kwargs: Dict[str, Any]) -> "Batch":
        """A lone run's step (what ``batch_penalty`` is given)."""
        return cls(x, y, loss, model, lambda logits, t: F.cross_entropy(logits, t, **loss_kwargs),
                   [p for p in model.parameters() if p.requires_grad], tuple(x.shape[1:]))


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

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module):
        return x, y

    def loss_kwargs(self) -> Dict[str, Any]:
        return {}

    def data_loss(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                  loss_kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
        return None

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        return None

    def batch_penalty(self, model: nn.Module, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      loss_kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
        return self.penalty(model)

    @classmethod
    def penalizes(cls) -> bool:
        """Whether it adds a loss term (and a ``penalty/<name>`` curve)."""
        return cls.penalty is not Regularizer.penalty or cls.batch_penalty is not Regularizer.batch_penalty

    def before_step(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass

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


def weight_params(model: nn.Module, exclude_bias_and_norm: bool) -> List[nn.Parameter]:
    """Parameters a norm penalty applies to. Biases and normalization scales/shifts are the
    one-dimensional parameters, so ``exclude_bias_and_norm`` keeps those of two or more."""
    return [p for p in model.parameters()
            if p.requires_grad and (p.dim() >= 2 or not exclude_bias_and_norm)]


def member_sum(t: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Σ of a parameter's entries: all of them for a lone model's tensor (0-dim), each member's
    for a population's stacked tensor, whose leading dimension is the member ((M,))."""
    return t.sum(dim=tuple(range(1, t.dim()))) if stacked else t.sum()


def per_member(v, stacked: bool, dims: int):
    """A hyperparameter shaped to broadcast against a tensor of ``dims`` dimensions whose
    leading one is the member (stacked: ``v`` is (M,)); a lone run's number as it is."""
    return v.view(-1, *([1] * (dims - 1))) if stacked else v
