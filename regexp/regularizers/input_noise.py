"""Gaussian input noise: each training batch is x + 𝒩(0, σ²I), drawn fresh every step.

For small σ this is, in expectation, the clean loss plus a penalty on the loss's gradient
with respect to the input (Bishop 1995: training with noise ≈ Tikhonov regularization).
Evaluation sees clean inputs. The population draws each member's noise with its own σ
(``StepNoise`` in regexp/population/noise.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from regexp.regularizers.base import Regularizer, register


@register
class InputNoise(Regularizer):
    name = "input_noise"

    @dataclass
    class Config:
        sigma: float = 0.1

    ranges = {"sigma": (lambda v: v >= 0, "a number >= 0")}

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"input_noise/sigma": self.cfg.sigma}, epoch)
