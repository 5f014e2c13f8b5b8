"""TensorBoard logging: scalars per epoch, weight histograms, and an HParams entry.

The HParams summary goes into the run's own event file (not a sub-folder), so
``tensorboard --logdir <sweep dir>`` lists each job once and compares them in the HParams tab.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

HPARAM_METRICS = ("acc/val", "acc/test", "loss/val", "loss/test", "acc/train", "loss/train")


class TBLogger:
    def __init__(self, log_dir: Path, enabled: bool = True, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def histograms(self, model: nn.Module, step: int) -> None:
        if self.writer:
            for name, p in model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)

    def figure(self, tag: str, fig, step: int = 0) -> None:
        if self.writer:
            self.writer.add_figure(tag, fig, step)

    def hparams(self, hparams: Dict[str, object], metrics: Iterable[str] = HPARAM_METRICS) -> None:
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(clean, {m: 0.0 for m in metrics})
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def layer_grad_norms(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Gradient norm of each weight matrix / kernel (the parameters with 2+ dimensions)."""
    return {name: p.grad.detach().norm() for name, p in model.named_parameters()
            if p.grad is not None and p.dim() >= 2}
