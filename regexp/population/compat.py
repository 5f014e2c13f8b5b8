"""Which runs can train together, and how they are grouped into populations and width buckets.

A population is one batched computation, so its members must agree on everything that
shapes the computation (data set and size, depth, activation, optimizer kind, schedule,
epochs, batch size ...). They may differ in the values that enter elementwise
(``MEMBER_KEYS``: seed, lr, momentum/betas, the adaptive rules' decays and accumulator
start, SAM's rho, weight decay, dropout p, label smoothing, input and weight noise σ, label
noise, random inputs (each member loads its own data), the gradient-clipping norm) and in
width (a Transformer's ``embed_dim``, padded exactly: regexp/population/stacked_transformer.py). Widths are grouped into buckets of similar size and padded
inside a bucket with masked units: a bucket holds widths whose per-example cost is within
``ratio`` of each other; only widths up to ``small`` (where per-step overhead, not
arithmetic, dominates) share a bucket regardless.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from regexp.probes.runner import active
from regexp.regularizers.base import REGULARIZERS as ALL

MODELS = ("mlp", "transformer")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "sam")
REGULARIZERS = ("weight_decay", "l1", "elastic_net", "decoupled_weight_decay", "dropout", "label_smoothing",
                "input_noise", "weight_noise", "early_stopping", "transfer")
# Values members of one population may differ in (everything else must be equal).
MEMBER_KEYS = (
    "seed", "model.width", "model.embed_dim", "data.label_noise", "data.random_inputs",
    "optimizer.lr", "optimizer.momentum", "optimizer.dampening", "optimizer.beta1",
    "optimizer.beta2", "optimizer.eps", "optimizer.weight_decay",
    "regularizer.weight_decay.lam", "regularizer.dropout.p", "regularizer.dropout.input_p",
    "regularizer.label_smoothing.eps", "regularizer.input_noise.sigma", "regularizer.weight_noise.sigma",
    "optimizer.initial_accumulator_value", "optimizer.alpha", "optimizer.rho", "trainer.grad_clip",
    "regularizer.l1.lam", "regularizer.elastic_net.lam1", "regularizer.elastic_net.lam2",
    "regularizer.decoupled_weight_decay.lam",
    # read on the host once per evaluation, member by member
    "regularizer.early_stopping.patience", "regularizer.early_stopping.min_delta",
    "regularizer.early_stopping.monitor",
    # each member's lone model loads its own start before the weights are stacked
    "regularizer.transfer.run_dir", "regularizer.transfer.file",
)
# Why each regularizer the population does not train stays out (the others are in REGULARIZERS).
NOT_STACKED = {
    "activity_kl": "its penalty reads hidden activations, which the stacked forward does not record",
    "activity_l1": "its penalty reads hidden activations, which the stacked forward does not record",
    "activity_student_t": "its penalty reads hidden activations, which the stacked forward does not record",
    "adversarial": "its FGSM batch needs each member's input gradient, which the stacked step does not take",
    "augmentation": "its random transforms of each member's batch are not drawn in the stacked step",
    "dropconnect": "its per-weight masks are not drawn for stacked weights",
    "ensemble": "it puts K models behind one module and replaces the data loss; an ensemble is not stacked",
    "gradient_norm_penalty": "its penalty differentiates each member's loss gradient, not written for stacked weights",
    "masked_reconstruction": "it adds a decoder to the model and replaces the data loss",
    "multi_task": "it adds heads and parameter groups of its own, which the stacked model lacks",
    "parameter_tying": "its reference weights (a run per member) do not enter a stacked penalty",
    "soft_weight_sharing": "its mixture is learned per member (parameter groups), not stacked",
    "tangent_prop": "its penalty needs each member's input Jacobian, not written for stacked weights",
}


def incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why ``cfg`` cannot join a population, or None when it can."""
    if cfg.model.name not in MODELS:
        return f"model.name={cfg.model.name} (population supports {', '.join(MODELS)})"
    if cfg.model.name == "transformer":
        why = transformer_incompatibility(cfg)
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
        why = NOT_STACKED.get(extra[0], "it has no stacked form")
        return f"regularizer {extra[0]} (population supports {', '.join(REGULARIZERS)}): {why}"
    # a penalty trains in a population only through its own penalty_of (never as a silent zero)
    unstacked = [r for r in cfg.regularizer if ALL[r].penalizes() and ALL[r].penalty_of is None]
    if unstacked:
        return f"regularizer {unstacked[0]} (its penalty has no penalty_of for stacked weights)"
    if cfg.optimizer.name == "sam" and "weight_noise" in cfg.regularizer:
        return ("optimizer=sam with regularizer weight_noise (the population draws a step's weight noise "
                "once; SAM's second pass would need draws of its own)")
    if "transfer" in cfg.regularizer and cfg.regularizer.transfer.freeze and active(cfg.probe):
        return ("regularizer.transfer.freeze=true with probes (the population's batched probes see every "
                "stacked tensor as trained)")
    if "early_stopping" in cfg.regularizer and active(cfg.probe):
        return ("regularizer early_stopping with probes (a member's final probes are measured on its "
                "restored best weights, which the population's batched probes do not see)")
    return None


# What the stacked Transformer (regexp/population/stacked_transformer.py) does not train, and why.
TRANSFORMER_UNSTACKED = {
    "dropout": "the stacked Transformer draws no per-member dropout masks of its sites",
    "weight_noise": "per-member weight noise is drawn for MLP layers only",
}


def transformer_incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why a Transformer run cannot join a population, or None."""
    for r in cfg.regularizer:
        if r in TRANSFORMER_UNSTACKED:
            return f"regularizer {r} with model=transformer ({TRANSFORMER_UNSTACKED[r]})"
    return None


def member_width(model_cfg) -> int:
    """What a population pads for a member: ``model.width``, a Transformer's ``model.embed_dim``."""
    return int(model_cfg.embed_dim if model_cfg.name == "transformer" else model_cfg.width)


def transformer_cost(model_cfg, input_shape: Sequence[int], classes: int) -> Callable[[int], float]:
    """Multiply-adds per example of a Transformer as a function of its embedding dimension."""
    from regexp.models import build_model

    model = build_model(model_cfg, tuple(input_shape), classes)  # tokens do not depend on the width
    t, td, depth = model.pos.shape[1], model.embed.in_features, int(model_cfg.depth)
    ratio = float(model_cfg.mlp_ratio)
    return lambda e: float(t * (td * e + depth * (4 * e * e + 2 * e * int(e * ratio) + 2 * t * e)) + e * classes)


def member_cost(cfg: DictConfig, input_shape: Sequence[int], classes: int) -> Callable[[int], float]:
    """Multiply-adds per example of a member of ``cfg``'s population as a function of its width."""
    if cfg.model.name == "transformer":
        return transformer_cost(cfg.model, input_shape, classes)
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


def bucket_widths(widths: Sequence[int], ratio: float = 1.5, small: int = 32,
                  cost: Callable[[int], float] = float) -> List[List[int]]:
    """Split the distinct widths into buckets of similar cost, each padded to its widest.

    Ascending widths join the current bucket while the widest one's ``cost`` stays within
    ``ratio`` of the narrowest one's (so no member computes more than ``ratio`` times its own
    work), or while all are at most ``small`` (overhead-bound: per-step dispatch, not
    arithmetic, is what they cost). With a quadratic cost (deep MLPs) buckets are narrower.
    """
    out: List[List[int]] = []
    for w in sorted(set(widths)):
        if out and (w <= small or cost(w) <= ratio * cost(out[-1][0])):
            out[-1].append(w)
        else:
            out.append([w])
    return out
