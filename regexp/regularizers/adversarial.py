"""Adversarial training with FGSM (Goodfellow et al. 2015): x' = x + ε · sign(∇ₓ L(x, y)).

In each training batch a fraction ``mix`` of the examples (the batch is already shuffled, so
the first ones) is replaced by its FGSM version against the current model; the loss is then
(1 − mix)·L(clean) + mix·L(adversarial), Goodfellow's mixed objective (:func:`fgsm` on the
population's stacked forward, regexp/population/transforms.py). The report gives the
test accuracy on clean and on FGSM inputs side by side.

With ``pgd_steps > 0`` the report adds the accuracy under an L∞ PGD attack (Madry et al. 2018):
``pgd_steps`` FGSM steps of size α (``pgd_step_size``; null: 2.5·ε/steps, Madry's choice), each
projected back onto the box ‖x' − x‖∞ ≤ ε (``pgd_eps``; null: ``eps``), from x itself (no
random start, so the attack is deterministic). Inputs are not clipped to a data range: MNIST-1D
signals and the standardized images have none. PGD is at least as strong as FGSM only up to
its step count; it is the usual yardstick of robustness. ``mix=0`` evaluates without
adversarial training. ``examples > 0`` saves that many test inputs with their FGSM and PGD
versions and the predictions on each to ``adversarial_examples.pt`` in the run folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.regularizers.base import Regularizer, register


def fgsm(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
         eps: Union[float, torch.Tensor]) -> torch.Tensor:
    """Move every input by exactly ε along the sign of the loss's input gradient.

    ``model`` maps inputs to logits: a lone model's (N, ...) → (N, C), or a population's
    stacked forward (M, N, D) → (M, N, C) with ε one value per member, (M, 1, 1). The summed
    loss of all members then gives each member's inputs its own loss's gradient."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        # sum: the sign ignores the scale
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)  # parameters' .grad stay untouched
    return (x + eps * grad.sign()).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
        step_size: float) -> torch.Tensor:
    """L∞ projected gradient ascent on the loss: x_{t+1} = clip_{[x−ε, x+ε]}(x_t + α·sign(∇ₓ L))."""
    x_adv = x.detach()
    for _ in range(steps):
        x_adv = torch.min(torch.max(fgsm(model, x_adv, y, step_size), x - eps), x + eps)
    return x_adv


@register
class Adversarial(Regularizer):
    name = "adversarial"

    @dataclass
    class Config:
        eps: float = 0.1
        mix: float = 0.5  # fraction of each batch replaced by its FGSM examples
        eval_batch_size: int = 1024
        pgd_steps: int = 0  # 0: no PGD evaluation
        pgd_eps: Optional[float] = None  # null: eps
        pgd_step_size: Optional[float] = None  # null: 2.5 * pgd_eps / pgd_steps
        examples: int = 0  # test inputs saved with their adversarial versions

    ranges = {"eps": (lambda v: v >= 0, "a number >= 0"),
              "mix": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
              "eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
              "pgd_steps": (lambda v: v >= 0, "an integer >= 0 (0: no PGD evaluation)"),
              "pgd_eps": (lambda v: v is None or v >= 0, "a number >= 0 or null (eps)"),
              "pgd_step_size": (lambda v: v is None or v > 0, "a number > 0 or null (2.5 * pgd_eps / pgd_steps)"),
              "examples": (lambda v: v >= 0, "an integer >= 0")}

    def pgd_settings(self):
        """(ε, steps, α) of the PGD evaluation."""
        eps = self.cfg.eps if self.cfg.pgd_eps is None else self.cfg.pgd_eps
        steps = self.cfg.pgd_steps
        alpha = self.cfg.pgd_step_size if self.cfg.pgd_step_size is not None else 2.5 * eps / max(steps, 1)
        return eps, steps, alpha

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        x, y = tensors["test"]
        if not len(y):
            return {}
        was_training = model.training
        model.eval()
        b = self.cfg.eval_batch_size
        batches = [(x[i:i + b], y[i:i + b]) for i in range(0, len(y), b)]
        x_adv = torch.cat([fgsm(model, xb, yb, self.cfg.eps) for xb, yb in batches])
        eps, steps, alpha = self.pgd_settings()
        x_pgd = torch.cat([pgd(model, xb, yb, eps, steps, alpha) for xb, yb in batches]) if steps else None
        model.train(was_training)
        clean_loss, clean_acc = evaluate(model, x, y)
        adv_loss, adv_acc = evaluate(model, x_adv, y)
        out = {"adversarial/clean_test_acc": clean_acc.item(), "adversarial/fgsm_test_acc": adv_acc.item(),
               "adversarial/clean_test_loss": clean_loss.item(), "adversarial/fgsm_test_loss": adv_loss.item()}
        if x_pgd is not None:
            pgd_loss, pgd_acc = evaluate(model, x_pgd, y)
            out.update({"adversarial/pgd_test_acc": pgd_acc.item(), "adversarial/pgd_test_loss": pgd_loss.item(),
                        "adversarial/pgd_eps": eps, "adversarial/pgd_steps": steps,
                        "adversarial/pgd_step_size": alpha})
        if self.cfg.examples and self.ctx.out_dir is not None:
            self._save_examples(model, x, y, x_adv, x_pgd)
        return out

    def _save_examples(self, model, x, y, x_fgsm, x_pgd) -> None:
        from regexp.train.io import save_torch

        k = min(self.cfg.examples, len(y))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            saved = {"label": y[:k].cpu(), "eps": torch.tensor(self.cfg.eps)}
            for name, inputs in (("clean", x), ("fgsm", x_fgsm), ("pgd", x_pgd)):
                if inputs is not None:
                    saved[name] = inputs[:k].cpu()
                    saved[f"{name}_pred"] = model(inputs[:k]).argmax(1).cpu()
        model.train(was_training)
        save_torch(self.ctx.out_dir / "adversarial_examples.pt", saved)

    def log(self, writer, epoch: int) -> None:
        writer.scalars({"adversarial/eps": self.cfg.eps}, epoch)
