"""Generalization probes, chosen by name: ``probe=[hessian,sharpness]``.

Measurements of the model that never change its training (see ``base.py``): ``hessian``
(top eigenvalues, trace, eigenvalue density) and ``sharpness`` (ρ-ball and Gaussian-noise
sharpness, parameter norms, margins, gradient noise).
"""
from regexp.probes.base import PROBES, Probe, ProbeInputs, register

# Importing the modules fills the registry.
from regexp.probes import hessian, sharpness  # noqa: E402,F401

__all__ = ["PROBES", "Probe", "ProbeInputs", "register"]
