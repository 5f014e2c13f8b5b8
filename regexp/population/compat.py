"""Which runs can train together, and how they are grouped into populations and width buckets.

A population is one batched computation, so its members must agree on everything that
shapes the computation (data set and size, depth, activation, optimizer kind, schedule,
epochs, batch size ...). They may differ in the values that enter elementwise
(``MEMBER_KEYS``: seed, lr, momentum/betas, weight decay, dropout p, label smoothing,
label noise) and in width. Widths are grouped into buckets of similar size and padded
inside a bucket with masked units; only widths below ``small`` (where per-step overhead,
not arithmetic, dominates) share a bucket regardless of ratio.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

MODELS = ("mlp",)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw")
REGULARIZERS = ("weight_decay", "dropout", "label_smoothing")
# Values members of one population may differ in (everything else must be equal).
MEMBER_KEYS = (
    "seed", "model.width", "data.label_noise",
    "optimizer.lr", "optimizer.momentum", "optimizer.dampening", "optimizer.beta1",
    "optimizer.beta2", "optimizer.eps", "optimizer.weight_decay",
    "regularizer.weight_decay.lam", "regularizer.dropout.p", "regularizer.dropout.input_p",
    "regularizer.label_smoothing.eps",
)
def incompatibility(cfg: DictConfig) -> Optional[str]:
    """Why ``cfg`` cannot join a population, or None when it can."""
    if cfg.model.name not in MODELS:
        return f"model.name={cfg.model.name} (population supports {', '.join(MODELS)})"
    if cfg.model.get("norm", "none") != "none":
        return f"model.norm={cfg.model.norm} (population supports none)"
    if cfg.optimizer.name not in OPTIMIZERS:
        return f"optimizer.name={cfg.optimizer.name} (population supports {', '.join(OPTIMIZERS)})"
    if cfg.optimizer.get("amsgrad", False):
        return "optimizer.amsgrad=true"
    extra = [r for r in cfg.regularizer if r not in REGULARIZERS]
    if extra:
        return f"regularizer {extra[0]} (population supports {', '.join(REGULARIZERS)})"
    if cfg.trainer.grad_clip:
        return "trainer.grad_clip is set"
    if cfg.trainer.checkpoint_every:
        return "trainer.checkpoint_every > 0 (a population checkpoints only at the end)"
    return None


def shared_part(point: Dict[str, Any]) -> Dict[str, Any]:
    """The swept values members of one population must share (all but ``MEMBER_KEYS``)."""
    return {k: v for k, v in point.items() if k not in MEMBER_KEYS}


def bucket_widths(widths: Sequence[int], ratio: float = 1.5, small: int = 32) -> List[List[int]]:
    """Split the distinct widths into buckets of similar size, each padded to its largest.

    Ascending widths join the current bucket while the largest stays within ``ratio`` of the
    smallest, or while all are at most ``small``: a bucket never pads a unit more than
    ``ratio - 1`` of its real size beyond that floor.
    """
    out: List[List[int]] = []
    for w in sorted(set(widths)):
        if out and (w <= small or w <= ratio * out[-1][0]):
            out[-1].append(w)
        else:
            out.append([w])
    return out
