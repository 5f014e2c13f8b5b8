"""The error of an ensemble from its members' errors (Goodfellow et al. §7.11).

Member k makes the error εₖ on an example; the ensemble averages the members' outputs, so its
error is the mean ε̄ = (1/K) Σₖ εₖ. With v = E[εₖ²] (averaged over members) and
c = E[εₖ εₗ] (averaged over the pairs k ≠ l),

    E[ε̄²] = v/K + (K − 1)c/K

exactly, for the empirical averages as for expectations: independent errors (c = 0) divide the
squared error by K, perfectly correlated ones (c = v) leave it unchanged. The identity is about
squared errors of outputs that the ensemble averages; for the classifiers, which average class
probabilities, εₖ is the vector pₖ(·|x) − onehot(y) and ε² its squared norm (the Brier score).
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F


def probability_errors(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Members' errors pₖ(·|x) − onehot(y), shape (K, n, classes), from probabilities (K, n, classes)."""
    return probs - F.one_hot(y, probs.shape[-1]).to(probs.dtype)


def decomposition(errors: torch.Tensor) -> Dict[str, float]:
    """``v``, ``c``, the ensemble's measured mean squared error and v/K + (K − 1)c/K.

    ``errors`` has shape (K, n) or (K, n, d): member, example, and output dimension (whose squares
    are summed). ``c`` is nan for a single member, which has no pair.
    """
    k, n = errors.shape[:2]
    e = errors.reshape(k, n, -1).double()
    gram = torch.einsum("knd,lnd->kl", e, e) / n  # E[εₖ·εₗ] for every pair of members
    v = float(gram.diagonal().mean())
    c = float((gram.sum() - gram.diagonal().sum()) / (k * (k - 1))) if k > 1 else math.nan
    theory = v if k == 1 else v / k + (k - 1) * c / k
    return {"v": v, "c": c, "measured": float(e.mean(0).pow(2).sum(-1).mean()), "theory": theory}
