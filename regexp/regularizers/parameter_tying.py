"""Parameter tying (Goodfellow et al., Deep Learning §7.9): pull the weights toward those of
another model, Ω = λ‖w − w_ref‖² summed over the tied tensors, so ∂Ω/∂w = 2λ(w − w_ref).

The reference is a finished run's ``model.pt`` (``run_dir``); its tensors are tied to this
model's parameters of the same name and shape, the others (a head for another number of
classes) train freely. With ``transfer`` (``freeze=false``) as well, the model also starts at
the reference: the penalty then keeps fine-tuning near the source weights instead of toward
zero, the "L2-SP" of Li, Grandvalet & Davis (2018), which regularizes better than plain
weight decay when the target task has few examples.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict

import torch

from regexp.regularizers.base import Regularizer, register
from regexp.regularizers.transfer import matching_tensors

log = logging.getLogger("regexp")


@register
class ParameterTying(Regularizer):
    name = "parameter_tying"

    @dataclass
    class Config:
        lam: float = 0.01
        run_dir: str = ""  # folder of a finished run: its weights are the reference
        file: str = "model.pt"  # or best_model.pt

    ranges = {"lam": (lambda v: v >= 0, "a number >= 0"),
              "run_dir": (lambda v: bool(v), "the folder of a finished run (holding model.pt)")}

    def attach(self, model) -> None:
        own = dict(model.named_parameters())  # buffers (batch-norm statistics) are not weights
        ref = matching_tensors(self.cfg.run_dir, self.cfg.file, own, f"regularizer.{self.name}")
        self.pairs = [(own[k], v.to(own[k].device, own[k].dtype)) for k, v in ref.items()]
        self.tied = sorted(ref)
        self.free = sorted(set(own) - set(ref))
        log.info("parameter_tying: %d tensors tied to %s/%s (%s); free: %s", len(self.tied), self.cfg.run_dir,
                 self.cfg.file, ", ".join(self.tied), ", ".join(self.free) or "none")

    def penalty(self, model) -> torch.Tensor:
        return self.cfg.lam * sum((p - r).pow(2).sum() for p, r in self.pairs)

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        with torch.no_grad():
            dist = sum((p - r).pow(2).sum() for p, r in self.pairs).sqrt().item()
        return {"parameter_tying/tied_tensors": len(self.tied), "parameter_tying/free_tensors": len(self.free),
                "parameter_tying/tied_params": sum(r.numel() for _, r in self.pairs),
                "parameter_tying/distance_to_reference": dist}
