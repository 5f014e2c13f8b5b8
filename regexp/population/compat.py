"""Which runs can train together, and how they are grouped into populations and width buckets.

A population is one batched computation, so its members must agree on everything that
shapes the computation (data set and size, depth, activation, optimizer kind, scheduler kind,
epochs, batch size ...). They may differ in the values that enter elementwise
(``MEMBER_KEYS``: seed, lr, momentum/betas, the adaptive rules' decays and accumulator
start, SAM's rho and ASAM's eta, the scheduler's values, weight decay, dropout p, label smoothing, input and weight noise σ, DropConnect's
p, augmentation's shift and scale, FGSM's ε, the penalties' λ, joint tying's partner seed (each
member's partner: regexp/population/partner.py), label noise, random inputs (each member loads
its own data), the gradient-clipping norm) and in width (or list of hidden widths,
``model.widths``: one population per depth, each layer padded to the bucket's widest; a CNN's
``model.channels``, stage by stage; a Transformer's ``embed_dim``, padded exactly:
regexp/population/stacked_transformer.py; a GRU's ``hidden_size``: regexp/population/stacked_gru.py). Widths are
grouped into buckets of similar size and padded inside a bucket with masked units: a bucket holds
widths whose per-example cost is within
``ratio`` of each other; only widths up to ``small`` (where per-step overhead, not
arithmetic, dominates) share a bucket regardless.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig

from regexp.regularizers.base import REGULARIZERS as ALL

MODELS = ("mlp", "cnn", "transformer", "gru")
NORMS = ("none", "batch", "layer")  # every model.norm the MLP builds (regexp/models/mlp.py)
CNN_NORMS = ("none", "batch", "layer", "instance")  # every model.norm the CNN builds (models/layers.py)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw", "sam")
REGULARIZERS = ("weight_decay", "l1", "elastic_net", "decoupled_weight_decay", "dropout", "label_smoothing",
                "input_noise", "weight_noise", "early_stopping", "transfer", "parameter_tying",
                "dropconnect", "augmentation", "adversarial", "activity_l1", "activity_student_t",
                "activity_kl", "multi_task", "tangent_prop", "gradient_norm_penalty",
                "masked_reconstruction", "soft_weight_sharing", "ensemble")
# Batch terms the population computes itself, with the regularizer's own formula (aux_heads.py).
BATCH_TERMS = ("multi_task",)
# Values members of one population may differ in (everything else must be equal).
MEMBER_KEYS = (
    "seed", "model.width", "model.widths", "model.channels", "model.embed_dim", "model.hidden_size",
    "data.label_noise", "data.random_inputs",
    "optimizer.lr", "optimizer.momentum", "optimizer.dampening", "optimizer.beta1",
    "optimizer.beta2", "optimizer.eps", "optimizer.weight_decay",
    "regularizer.weight_decay.lam", "regularizer.dropout.p", "regularizer.dropout.input_p",
    "regularizer.label_smoothing.eps", "regularizer.input_noise.sigma", "regularizer.weight_noise.sigma",
    "optimizer.initial_accumulator_value", "optimizer.alpha", "optimizer.rho", "optimizer.eta", "trainer.grad_clip",
    "regularizer.l1.lam", "regularizer.elastic_net.lam1", "regularizer.elastic_net.lam2",
    "regularizer.decoupled_weight_decay.lam",
    # read on the host once per evaluation, member by member
    "regularizer.early_stopping.patience", "regularizer.early_stopping.min_delta",
    "regularizer.early_stopping.monitor",
    # each member's lone model loads its own start before the weights are stacked
    "regularizer.transfer.run_dir", "regularizer.transfer.file",
    "regularizer.parameter_tying.lam",
    # joint tying: each member's lone regularizer builds its own partner (population/partner.py)
    "regularizer.parameter_tying.partner_seed",
    "regularizer.dropconnect.p", "regularizer.augmentation.shift", "regularizer.augmentation.scale",
    "regularizer.adversarial.eps",
    "regularizer.activity_l1.alpha", "regularizer.activity_student_t.alpha", "regularizer.activity_student_t.gamma",
    "regularizer.activity_kl.alpha", "regularizer.activity_kl.rho", "regularizer.multi_task.lam",
    "regularizer.tangent_prop.lam", "regularizer.tangent_prop.scale_step", "regularizer.gradient_norm_penalty.lam",
    "regularizer.masked_reconstruction.fill",
    # each member's own mixture: its λ, its group's lr, its start, and its report's merging
    "regularizer.soft_weight_sharing.tau", "regularizer.soft_weight_sharing.lr",
    "regularizer.soft_weight_sharing.init_sigma", "regularizer.soft_weight_sharing.merge_distance",
    "regularizer.soft_weight_sharing.pi0", "regularizer.soft_weight_sharing.gamma_alpha",
    "regularizer.soft_weight_sharing.gamma_beta",
    # each member's own lr factor per step (population/schedule.py); the scheduler's name is shared
    "scheduler.warmup_steps", "scheduler.min_lr_ratio", "scheduler.step_size", "scheduler.gamma",
    "scheduler.period", "scheduler.period_mult",
)
# Why each regularizer the population does not train stays out (the others are in REGULARIZERS).
NOT_STACKED: Dict[str, str] = {}
# What trains beside ``ensemble`` (regexp/population/ensemble.py): what acts on each of its K models
# alone, elementwise, the batch transforms all K read alike (one noisy or augmented batch), and what
# acts on the Ensemble as one model through its owner's slices (FGSM on the input gradient of its
# prediction, tangent_prop's J_x of that prediction, the gradient norm over all K models' parameters:
# Owners.fgsm, Owners.joint; one soft-weight-sharing mixture over all K models' weights, a copy per
# slice kept equal, counted once in SAM's ascent norm: population/mixture.py). What the former loop matched to the Ensemble's parameters
# by name (``members.k.*``) does so here: transfer loads model k from an ensemble run's model k (the
# lone Ensemble module's attach), reference tying pulls model k toward the reference's model k
# (each slice's share of it: ParameterTying.within).
WITH_ENSEMBLE = ("ensemble", "weight_decay", "l1", "elastic_net", "decoupled_weight_decay", "dropout",
                 "label_smoothing", "early_stopping", "weight_noise", "dropconnect", "activity_l1",
                 "activity_student_t", "activity_kl", "input_noise", "augmentation",
                 "adversarial", "tangent_prop", "gradient_norm_penalty", "soft_weight_sharing", "transfer",
                 "parameter_tying")
# Why the others stay out: the former loop, given the Ensemble module, refused them or failed
# (masked_reconstruction listed before a one-model ensemble ran, fitting the log-softmax of the
# reconstruction to the signal: no pretext either).
NOT_WITH_ENSEMBLE: Dict[str, str] = {
    "multi_task": "the former loop refused it too: its auxiliary head reads the input of the model's Linear "
                  "head, and the Ensemble of K models has none",
    "masked_reconstruction": "the former loop could not train it either: its reconstruction head replaces the "
                             "model's Linear head, which the Ensemble has none of, or only model 0's, whose outputs "
                             "the Ensemble cannot average with the other models' class scores",
}


def ensemble_incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why an ensemble run cannot join a population, or None (also None without ``ensemble``)."""
    if "ensemble" not in cfg.regularizer:
        return None
    other = [r for r in cfg.regularizer if r not in WITH_ENSEMBLE]
    if other:
        why = NOT_WITH_ENSEMBLE.get(other[0], "it has no form over an ensemble's K models")
        return f"regularizer {other[0]} with ensemble ({why})"
    tying = cfg.regularizer.get("parameter_tying")
    if tying is not None and tying.mode == "joint":
        return ("regularizer parameter_tying.mode=joint with ensemble (the former loop refused it too: its partner "
                "is one plain model, which shares no parameter name with the Ensemble's members.k.*)")
    return None


def incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why ``cfg`` cannot join a population, or None when it can."""
    if cfg.model.name not in MODELS:
        return f"model.name={cfg.model.name} (population supports {', '.join(MODELS)})"
    if cfg.model.name != "mlp":
        why = model_incompatibility(cfg)
        if why is not None:
            return why
    norms = CNN_NORMS if cfg.model.name == "cnn" else NORMS
    if cfg.model.get("norm", "none") not in norms:
        return f"model.norm={cfg.model.norm} (population supports {', '.join(norms)})"
    if cfg.optimizer.name not in OPTIMIZERS:
        return f"optimizer.name={cfg.optimizer.name} (population supports {', '.join(OPTIMIZERS)})"
    extra = [r for r in cfg.regularizer if r not in REGULARIZERS]
    if extra:
        why = NOT_STACKED.get(extra[0], "it has no stacked form")
        return f"regularizer {extra[0]} (population supports {', '.join(REGULARIZERS)}): {why}"
    # a penalty trains in a population only through its own penalty_of, activity_of or
    # batch_penalty_of (never as a silent zero)
    unstacked = [r for r in cfg.regularizer
                 if ALL[r].penalizes() and ALL[r].penalty_of is None and ALL[r].activity_of is None
                 and ALL[r].batch_penalty_of is None and r not in BATCH_TERMS]
    if unstacked:
        return f"regularizer {unstacked[0]} (its penalty has no penalty_of for stacked weights)"
    why = ensemble_incompatibility(cfg)
    if why is not None:
        return why
    return None


# What a stacked CNN or Transformer trains through the MLP population's own code paths: penalties
# on its stacked parameters, the batch transforms (FGSM through its stacked forward), dropout at
# its own sites, weight noise and DropConnect on each member's block of its weights, activity
# penalties and multi_task's heads on what its forward records, early stopping, the starts it
# loads, learned mixtures, the pretext head; a CNN also the double-backward batch penalties.
STACKED_REGULARIZERS = ("weight_decay", "l1", "elastic_net", "decoupled_weight_decay", "label_smoothing",
                        "input_noise", "early_stopping", "transfer", "augmentation", "adversarial",
                        "parameter_tying", "dropout", "soft_weight_sharing", "activity_l1", "activity_student_t",
                        "masked_reconstruction", "multi_task", "weight_noise", "dropconnect", "ensemble")
CNN_REGULARIZERS = STACKED_REGULARIZERS + ("tangent_prop", "gradient_norm_penalty", "activity_kl")
# a GRU: the double-backward batch penalties (its stacked recurrence is plain autograd), no weight draws
GRU_REGULARIZERS = tuple(r for r in STACKED_REGULARIZERS if r not in ("weight_noise", "dropconnect")) + (
    "tangent_prop", "gradient_norm_penalty")
# Why the rest stays out, for every stacked model but the MLP (none now), then for one of them:
NOT_FOR_NEW_MODELS: Dict[str, str] = {}
NOT_FOR_MODEL = {"transformer": {
    # torch's CPU attention kernel has no double backward: a lone run fails alike
    "tangent_prop": "its double backward would run through attention, whose CPU kernel has none",
    "gradient_norm_penalty": "its double backward would run through attention, whose CPU kernel has none",
    "activity_kl": "its firing rates need relu or sigmoid units; a Transformer's hidden site is a layer norm's",
}, "gru": {
    # a lone GRU run refuses these three (regularizers/weight_transform.py, activity_kl.py)
    "weight_noise": "a lone GRU run refuses it: it perturbs Linear/Conv weights, not the recurrent ones",
    "dropconnect": "a lone GRU run refuses it: it perturbs Linear/Conv weights, not the recurrent ones",
    "activity_kl": "a lone GRU run refuses it: the GRU's hidden site emits no relu or sigmoid firing rates",
}}
# What each stacked model other than the MLP trains (the rest: NOT_FOR_MODEL, NOT_STACKED)
MODEL_REGULARIZERS = {"cnn": CNN_REGULARIZERS, "transformer": STACKED_REGULARIZERS, "gru": GRU_REGULARIZERS}


def model_incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why a CNN, Transformer or GRU run (regexp/population/stacked_cnn.py, stacked_transformer.py,
    stacked_gru.py) cannot join a population, or None."""
    name = cfg.model.name
    for r in cfg.regularizer:
        why = NOT_FOR_NEW_MODELS.get(r) or NOT_FOR_MODEL.get(name, {}).get(r)
        if why is not None:
            return f"regularizer {r} with model={name} ({why})"
    return None


# What a population pads for a member: an MLP's widest hidden layer (an int), its list of
# hidden widths (``model.widths``, a tuple, in bucketing), a CNN's channels (a tuple, one per
# stage), a Transformer's embed_dim, a GRU's hidden_size (ints). A group never mixes models, and tuples of
# different lengths never share a bucket.
Width = Union[int, Tuple[int, ...]]


def member_width(model_cfg) -> Width:
    """A member's padded size: a CNN's ``model.channels``, a Transformer's ``model.embed_dim``,
    a GRU's ``model.hidden_size``, an MLP's widest hidden layer."""
    if model_cfg.name == "cnn":
        return tuple(int(c) for c in model_cfg.channels)
    if model_cfg.name == "transformer":
        return int(model_cfg.embed_dim)
    if model_cfg.name == "gru":
        return int(model_cfg.hidden_size)
    return max(hidden_widths(model_cfg), default=int(model_cfg.width))


def hidden_widths(model_cfg) -> List[int]:
    """An MLP's hidden widths, input to output (``model.widths``, or depth times ``model.width``);
    a CNN's channels per stage; a Transformer's embedding dimension, a GRU's hidden size (one padded size)."""
    if model_cfg.name == "cnn":
        return [int(c) for c in model_cfg.channels]
    if model_cfg.name == "transformer":
        return [int(model_cfg.embed_dim)]
    if model_cfg.name == "gru":
        return [int(model_cfg.hidden_size)]
    listed = model_cfg.get("widths")
    if listed is not None:
        return [int(w) for w in listed]
    return [int(model_cfg.width)] * int(model_cfg.depth)


def bucket_width(widths: Sequence[Width]) -> Width:
    """The width a bucket pads its members to: the widest (a CNN's stage by stage)."""
    if isinstance(widths[0], tuple):
        return tuple(max(cs) for cs in zip(*widths))
    return max(widths)


def cnn_cost(model_cfg, input_shape: Sequence[int], classes: int) -> Callable[[Width], float]:
    """Multiply-adds per example of a CNN (1-D or 2-D) as a function of its channels per stage."""
    from omegaconf import OmegaConf

    from regexp.models import build_model
    from regexp.population.stacked_cnn import conv_positions, stages_of

    stages = len(model_cfg.channels)
    probe = OmegaConf.merge(model_cfg, {"channels": [1] * stages})
    model = build_model(probe, tuple(input_shape), classes)  # lengths do not depend on channels
    positions = conv_positions(model, input_shape[1:])
    kernels = [st.kernel ** model.dims for st in stages_of(model)]
    per_channel = int(model.head.in_features)  # the head's inputs per channel of the last stage (1 under gap)

    def cost(ch: Width) -> float:
        c_in = [int(input_shape[0]), *ch[:-1]]
        return float(sum(n * c * ci * k for n, c, ci, k in zip(positions, ch, c_in, kernels))
                     + ch[-1] * per_channel * classes)
    return cost


def transformer_cost(model_cfg, input_shape: Sequence[int], classes: int) -> Callable[[int], float]:
    """Multiply-adds per example of a Transformer as a function of its embedding dimension."""
    from regexp.models import build_model

    model = build_model(model_cfg, tuple(input_shape), classes)  # tokens do not depend on the width
    t, td, depth = model.pos.shape[1], model.embed.in_features, int(model_cfg.depth)
    ratio = float(model_cfg.mlp_ratio)
    return lambda e: float(t * (td * e + depth * (4 * e * e + 2 * e * int(e * ratio) + 2 * t * e)) + e * classes)


def gru_cost(model_cfg, input_shape: Sequence[int], classes: int) -> Callable[[int], float]:
    """Multiply-adds per example of a GRU as a function of its hidden size: per layer, direction
    and step the input's and the state's products with the three gates, then the head."""
    steps = int(input_shape[1])
    features = int(input_shape[0]) * (int(input_shape[2]) if len(input_shape) == 3 else 1)
    d, layers = (2 if model_cfg.bidirectional else 1), int(model_cfg.layers)
    per_step = 1 if model_cfg.head == "last" else steps
    return lambda h: float(steps * d * (3 * h * (features + h) + (layers - 1) * 3 * h * (d * h + h))
                           + per_step * d * h * classes)


def member_cost(cfg: DictConfig, input_shape: Sequence[int], classes: int,
                listed: bool = False) -> Callable[[Width], float]:
    """Multiply-adds per example of a member of ``cfg``'s population as a function of its width
    (``listed``: MLP members give their list of hidden widths, ``model.widths``)."""
    in_dim = math.prod(int(d) for d in input_shape)
    if cfg.model.name == "cnn":
        return cnn_cost(cfg.model, input_shape, classes)
    if cfg.model.name == "transformer":
        return transformer_cost(cfg.model, input_shape, classes)
    if cfg.model.name == "gru":
        return gru_cost(cfg.model, input_shape, classes)
    if listed:
        return widths_cost(in_dim, classes)
    return mlp_cost(in_dim, int(cfg.model.depth), classes)


def shared_part(point: Dict[str, Any]) -> Dict[str, Any]:
    """The swept values members of one population must share (all but ``MEMBER_KEYS``)."""
    return {k: v for k, v in point.items() if k not in MEMBER_KEYS}


def mlp_cost(in_dim: int, depth: int, classes: int) -> Callable[[int], float]:
    """Multiply-adds per example of an MLP as a function of its width (depth 0, logistic
    regression, has no hidden layer: its width is unused and its cost fixed)."""
    if depth == 0:
        return lambda w: float(in_dim * classes)
    return lambda w: in_dim * w + (depth - 1) * w * w + w * classes


def widths_cost(in_dim: int, classes: int) -> Callable[[Sequence[int]], float]:
    """Multiply-adds per example of an MLP as a function of its list of hidden widths."""
    return lambda ws: float(sum(a * b for a, b in zip([in_dim, *ws], [*ws, classes])))


def bucket_widths(widths: Sequence[Width], ratio: float = 1.5, small: int = 32,
                  cost: Callable[[Width], float] = float) -> List[List[Width]]:
    """Split the distinct widths into buckets of similar cost, each padded to its widest.

    Ascending widths join the current bucket while the widest one's ``cost`` stays within
    ``ratio`` of the narrowest one's (so no member computes more than ``ratio`` times its own
    work), or while all are at most ``small`` (overhead-bound: per-step dispatch, not
    arithmetic, is what they cost). With a quadratic cost (deep MLPs) buckets are narrower.
    A width may be a tuple of hidden widths (``model.widths``, of one depth; ``cost`` takes it):
    they go by cost, and a tuple is small when its widest layer is.
    """
    out: List[List[Width]] = []
    size = lambda w: max(w, default=0) if isinstance(w, tuple) else w  # noqa: E731
    depth = lambda w: len(w) if isinstance(w, tuple) else 0  # noqa: E731 (lists of other lengths never stack)
    for w in sorted(set(widths), key=lambda w: (depth(w), cost(w), w)):
        joins = bool(out) and depth(w) == depth(out[-1][0]) and (
            size(w) <= small or cost(bucket_width(out[-1] + [w])) <= ratio * cost(out[-1][0]))
        if joins:
            out[-1].append(w)
        else:
            out.append([w])
    return out
