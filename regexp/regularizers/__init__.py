"""Regularizers, one file each, chosen by name: ``regularizer=[weight_decay,dropout]``.

To add one: write ``regexp/regularizers/<name>.py`` with a subclass of
:class:`~regexp.regularizers.base.Regularizer` decorated with ``@register``, give it a
``Config`` dataclass, import it below, and add ``configs/regularizer/<name>.yaml``.
"""
from regexp.regularizers.base import REGULARIZERS, Regularizer, build_regularizers, register

# Importing the modules fills the registry.
from regexp.regularizers import dropout, label_smoothing, weight_decay  # noqa: E402,F401

__all__ = ["REGULARIZERS", "Regularizer", "build_regularizers", "register"]
