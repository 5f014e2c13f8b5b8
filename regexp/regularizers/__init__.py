"""Regularizers, one file each, chosen by name: ``regularizer=[weight_decay,dropout]``.

To add one: write ``regexp/regularizers/<name>.py`` with a subclass of
:class:`~regexp.regularizers.base.Regularizer` decorated with ``@register``, give it a
``Config`` dataclass, import it below, and add ``configs/regularizer/<name>.yaml``.
Helper modules (no regularizer of their own): ``activity``, ``bootstrap``, ``mc_dropout``,
``weight_transform``.
"""
from regexp.regularizers.base import REGULARIZERS, Regularizer, build_regularizers, register

# Importing the modules fills the registry.
from regexp.regularizers import (  # noqa: E402,F401
    activity_kl, activity_l1, activity_student_t, adversarial, augmentation, decoupled_weight_decay, dropconnect,
    dropout, early_stopping, elastic_net, ensemble, gradient_norm_penalty, input_noise, l1,
    label_smoothing, masked_reconstruction, multi_task, parameter_tying, soft_weight_sharing, tangent_prop,
    transfer, weight_decay, weight_noise,
)

__all__ = ["REGULARIZERS", "Regularizer", "build_regularizers", "register"]
