"""Transfer learning / fine-tuning: start from a saved run's weights.

``attach`` loads ``<run_dir>/<file>`` (a ``model.pt`` that a run wrote) into the new model. Tensors
whose shape differs (a head for another number of classes) keep their fresh initialisation.
With ``freeze`` every parameter outside the output layer (the modules named ``head``) gets
``requires_grad = False``, so the trainer leaves it out of the optimizer: the textbook recipe
of retraining only the last layer on the new task.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

from regexp.errors import ConfigError
from regexp.regularizers.base import Regularizer, register
from regexp.train.io import load_tensors


def is_head(param_name: str) -> bool:
    return "head" in param_name.split(".")[:-1][-1:]


def matching_tensors(run_dir: str, file: str, own: Dict[str, torch.Tensor], key: str) -> Dict[str, torch.Tensor]:
    """The tensors of ``<run_dir>/<file>`` (a run's saved state dict) whose name and shape are
    in ``own``. A missing or corrupt file, or one sharing no tensor with ``own``, is refused
    with a message naming ``key`` (the config key that pointed there) and the path."""
    path = Path(run_dir).expanduser() / file
    if not path.is_file():
        raise ConfigError(f"{key}.run_dir={run_dir!r} is invalid: {path} does not exist; expected the "
                          "folder of a finished run")
    saved = load_tensors(path, "model file", f"point {key}.run_dir at a run regexp wrote")
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ConfigError(f"{path}: not a model file (expected a state dict of tensors, as a run's "
                          f"{file}); point {key}.run_dir at a run regexp wrote")
    usable = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not usable:
        # an ensemble's tensors are its models' (members.k.*): a plain run's names never match them
        hint = (" (an ensemble's parameters are named members.k.*: expected an ensemble run's folder)"
                if own and all(k.startswith("members.") for k in own) else "")
        raise ConfigError(f"{key}.run_dir={run_dir!r} is invalid: its {file} ({path}) shares no tensor "
                          f"of matching name and shape with this model{hint}")
    return usable


@register
class Transfer(Regularizer):
    name = "transfer"

    @dataclass
    class Config:
        run_dir: str = ""  # folder of a finished run
        file: str = "model.pt"  # or best_model.pt
        freeze: bool = True  # train only the output layer

    ranges = {"run_dir": (lambda v: bool(v), "the folder of a finished run (holding model.pt)")}

    def attach(self, model) -> None:
        own = model.state_dict()
        usable = matching_tensors(self.cfg.run_dir, self.cfg.file, own, f"regularizer.{self.name}")
        model.load_state_dict(usable, strict=False)
        self.loaded, self.skipped = len(usable), len(own) - len(usable)
        if self.cfg.freeze:
            for name, p in model.named_parameters():
                p.requires_grad_(is_head(name))

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"transfer/loaded_tensors": self.loaded, "transfer/kept_fresh_tensors": self.skipped,
                "transfer/trainable_params": trainable}
