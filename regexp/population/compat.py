"""Which runs can train together, and how they are grouped into populations and width buckets.

A population is one batched computation, so its members must agree on everything that
shapes the computation (data set and size, depth, activation, optimizer kind, schedule,
epochs, batch size ...). They may differ in the values that enter elementwise
(``MEMBER_KEYS``: seed, lr, momentum/betas, the adaptive rules' decays and accumulator
start, SAM's rho, weight decay, dropout p, label smoothing, input and weight noise σ, label
noise, random inputs (each member loads its own data), the gradient-clipping norm) and in
width. Widths are grouped into buckets of similar size and padded
inside a bucket with masked units: a bucket holds widths whose per-example cost is within
``ratio`` of each other; only widths up to ``small`` (where per-step overhead, not
arithmetic, dominates) share a bucket regardless.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig

from regexp.regularizers.base import REGULARIZERS as ALL

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "sam")
REGULARIZERS = ("weight_decay", "l1", "elastic_net", "decoupled_weight_decay", "dropout", "label_smoothing",
                "input_noise", "weight_noise")
# Values members of one population may differ in (everything else must be equal).
MEMBER_KEYS = (
    "seed", "model.width", "model.channels", "data.label_noise", "data.random_inputs",
    "optimizer.lr", "optimizer.momentum", "optimizer.dampening", "optimizer.beta1",
    "optimizer.beta2", "optimizer.eps", "optimizer.weight_decay",
    "regularizer.weight_decay.lam", "regularizer.dropout.p", "regularizer.dropout.input_p",
    "regularizer.label_smoothing.eps", "regularizer.input_noise.sigma", "regularizer.weight_noise.sigma",
    "optimizer.initial_accumulator_value", "optimizer.alpha", "optimizer.rho", "trainer.grad_clip",
    "regularizer.l1.lam", "regularizer.elastic_net.lam1", "regularizer.elastic_net.lam2",
    "regularizer.decoupled_weight_decay.lam",
)
def incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why ``cfg`` cannot join a population, or None when it can."""
    if cfg.model.name not in MODELS:
        return f"model.name={cfg.model.name} (population supports {', '.join(MODELS)})"
    if cfg.model.name == "cnn":
        why = cnn_incompatibility(cfg)
        if why is not None:
            return why
    if cfg.model.get("norm", "none") != "none":
        return f"model.norm={cfg.model.norm} (population supports none)"
    if cfg.model.get("widths") is not None:
        return "model.widths is set (population supports depth layers of one model.width)"
    if cfg.model.get("residual", False):
        return "model.residual=true (population supports plain MLPs)"
    if cfg.optimizer.name not in OPTIMIZERS:
        return f"optimizer.name={cfg.optimizer.name} (population supports {', '.join(OPTIMIZERS)})"
    if cfg.optimizer.get("amsgrad", False):
        return "optimizer.amsgrad=true"
    extra = [r for r in cfg.regularizer if r not in REGULARIZERS]
    if extra:
        return f"regularizer {extra[0]} (population supports {', '.join(REGULARIZERS)})"
    # a penalty trains in a population only through its own penalty_of (never as a silent zero)
    unstacked = [r for r in cfg.regularizer if ALL[r].penalizes() and ALL[r].penalty_of is None]
    if unstacked:
        return f"regularizer {unstacked[0]} (its penalty has no penalty_of for stacked weights)"
    if cfg.optimizer.name == "sam" and "weight_noise" in cfg.regularizer:
        return ("optimizer=sam with regularizer weight_noise (the population draws a step's weight noise "
                "once; SAM's second pass would need draws of its own)")
    return None


SIGNAL_DATA = ("mnist1d",)  # data sets of 1-D signals (C, L): what StackedCNN's Conv1d stacks
CNN_UNSTACKED = {"dropout": "a CNN has no per-member dropout masks of its feature maps yet",
                 "weight_noise": "per-member weight noise is drawn for linear layers only"}


def cnn_incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why a CNN run cannot join a population (regexp/population/stacked_cnn.py), or None."""
    if cfg.data.name not in SIGNAL_DATA:
        return (f"model=cnn on data.name={cfg.data.name} (population stacks Conv1d on 1-D signals: "
                f"{', '.join(SIGNAL_DATA)})")
    if cfg.model.get("norm", "none") != "none":
        return (f"model.norm={cfg.model.norm} for a CNN (population supports none: batch norm would "
                "need per-member running statistics)")
    for r in cfg.regularizer:
        if r in CNN_UNSTACKED:
            return f"regularizer {r} with model=cnn ({CNN_UNSTACKED[r]})"
    return None


Width = Union[int, Tuple[int, ...]]  # an MLP's width; a CNN's channels, one per stage


def member_width(model_cfg) -> Width:
    """What a population pads for a member: ``model.width``, or a CNN's ``model.channels``."""
    if model_cfg.name == "cnn":
        return tuple(int(c) for c in model_cfg.channels)
    return int(model_cfg.width)


def bucket_width(widths: Sequence[Width]) -> Width:
    """The width a bucket pads its members to: the widest (a CNN's stage by stage)."""
    if isinstance(widths[0], tuple):
        return tuple(max(cs) for cs in zip(*widths))
    return max(widths)


def cnn_cost(model_cfg, input_shape: Sequence[int], classes: int) -> Callable[[Width], float]:
    """Multiply-adds per example of a 1-D CNN as a function of its channels per stage."""
    from omegaconf import OmegaConf

    from regexp.models import build_model
    from regexp.population.stacked_cnn import conv_lengths, stages_of

    stages = len(model_cfg.channels)
    probe = OmegaConf.merge(model_cfg, {"channels": [1] * stages})
    model = build_model(probe, tuple(input_shape), classes)  # lengths do not depend on channels
    lengths = conv_lengths(model, int(input_shape[-1]))
    kernels = [st.kernel for st in stages_of(model)]
    positions = int(model.head.in_features)  # per channel of the last stage (1 under gap)

    def cost(ch: Width) -> float:
        c_in = [int(input_shape[0]), *ch[:-1]]
        return float(sum(n * c * ci * k for n, c, ci, k in zip(lengths, ch, c_in, kernels))
                     + ch[-1] * positions * classes)
    return cost


def member_cost(cfg: DictConfig, input_shape: Sequence[int], classes: int) -> Callable[[Width], float]:
    """Multiply-adds per example of a member of ``cfg``'s population as a function of its width."""
    if cfg.model.name == "cnn":
        return cnn_cost(cfg.model, input_shape, classes)
    return mlp_cost(math.prod(int(d) for d in input_shape), int(cfg.model.depth), classes)


def shared_part(point: Dict[str, Any]) -> Dict[str, Any]:
    """The swept values members of one population must share (all but ``MEMBER_KEYS``)."""
    return {k: v for k, v in point.items() if k not in MEMBER_KEYS}


def mlp_cost(in_dim: int, depth: int, classes: int) -> Callable[[int], float]:
    """Multiply-adds per example of an MLP as a function of its width (depth 0, logistic
    regression, has no hidden layer: its width is unused and its cost fixed)."""
    if depth == 0:
        return lambda w: float(in_dim * classes)
    return lambda w: in_dim * w + (depth - 1) * w * w + w * classes


def bucket_widths(widths: Sequence[Width], ratio: float = 1.5, small: int = 32,
                  cost: Callable[[Width], float] = float) -> List[List[Width]]:
    """Split the distinct widths into buckets of similar cost, each padded to its widest.

    Ascending widths join the current bucket while the widest one's ``cost`` stays within
    ``ratio`` of the narrowest one's (so no member computes more than ``ratio`` times its own
    work), or while all are at most ``small`` (overhead-bound: per-step dispatch, not
    arithmetic, is what they cost). With a quadratic cost (deep MLPs) buckets are narrower.
    """
    out: List[List[Width]] = []
    size = lambda w: max(w) if isinstance(w, tuple) else w  # noqa: E731
    stages = lambda w: len(w) if isinstance(w, tuple) else 0  # noqa: E731 (CNNs of other depths never stack)
    for w in sorted(set(widths), key=lambda w: (stages(w), cost(w), w)):
        joins = bool(out) and stages(w) == stages(out[-1][0]) and (
            size(w) <= small or cost(bucket_width(out[-1] + [w])) <= ratio * cost(out[-1][0]))
        if joins:
            out[-1].append(w)
        else:
            out.append([w])
    return out
