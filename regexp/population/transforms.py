"""A population's training batches, each member's transformed with its own draws and values.

A step passes each member's batch through the batch regularizers in config order
(``input_noise``, ``augmentation``, ``adversarial``), then runs the forward pass; the
transforms are functions written once in the regularizers' modules:

- ``augmentation``: each member's shifts and scales (crops and flips for images) are
  :func:`~regexp.regularizers.augmentation.draws` from its own generator (exact mode: the
  lone run's numbers, in its order; batched mode: the shared one), then one
  :func:`~regexp.regularizers.augmentation.augment` transforms every member's examples.
- ``masked_reconstruction`` listed after another of these: each member's segments hidden
  (:mod:`regexp.population.pretext`) at that point, so its targets are the batch as transformed
  so far (noisy, augmented), as the lone run's; listed first, the engine hides them before the
  step's other draws.
- ``adversarial``: :func:`~regexp.regularizers.adversarial.fgsm` on the stacked forward with a
  per-member ε; its forward pass draws fresh dropout masks and weight perturbations, as the
  lone run's FGSM pass does in training mode. A lone run with ε = 0 skips the attack and draws
  nothing, so such a member's generator is put back after the pass (exact mode).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from regexp.population.noise import StepNoise
from regexp.population.pretext import MemberPretext
from regexp.regularizers.adversarial import fgsm
from regexp.regularizers.augmentation import augment, draws

KINDS = ("input_noise", "augmentation", "adversarial")
PRETEXT = "masked_reconstruction"
Forward = Callable[..., torch.Tensor]


class BatchTransforms:
    def __init__(self, regs, input_shape: Tuple[int, ...], noise: StepNoise, device: torch.device,
                 pretext: Optional[MemberPretext] = None):
        """``regs``: every member's regularizer configs (one ``cfg.regularizer`` per member,
        the same names in the same order; their numeric values may differ); ``pretext``: the
        members' masked_reconstruction, if they have it."""
        kinds = [k for k in regs[0] if k in KINDS or k == PRETEXT]
        # listed first, nothing precedes its masking: the engine hides the segments before the
        # step's other draws (the lone order either way)
        self.pretext_first = bool(kinds) and kinds[0] == PRETEXT
        self.kinds = kinds[1:] if self.pretext_first else kinds
        self.pretext = pretext
        self.input_shape, self.noise, self.device = tuple(input_shape), noise, device
        aug = [r.get("augmentation") for r in regs]
        self.shift = [int(a.shift) for a in aug] if aug[0] is not None else None
        self.scale = [float(a.scale) for a in aug] if aug[0] is not None else None
        self.flip = bool(aug[0].flip) if aug[0] is not None else False
        adv = [r.get("adversarial") for r in regs]
        self.eps = [float(a.eps) for a in adv] if adv[0] is not None else None
        self.mix = float(adv[0].mix) if adv[0] is not None else 0.0
        # an ensemble's (Owners.attach): its slices' one batch, FGSM against its prediction
        self.share: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.attack = fgsm

    @property
    def active(self) -> bool:
        """Whether a step transforms its batch beyond input noise (which StepNoise draws alone)
        and a leading pretext mask (which the engine draws)."""
        return any(k in self.kinds for k in ("augmentation", "adversarial", PRETEXT))

    def keep(self, idx: List[int]) -> None:
        for name in ("shift", "scale", "eps"):
            if getattr(self, name) is not None:
                setattr(self, name, [getattr(self, name)[i] for i in idx])

    def draw(self, x: torch.Tensor, y: torch.Tensor, forward: Forward, weights: List[torch.Tensor],
             widths: List[int]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]], List[torch.Tensor]]:
        """Everything a lone step draws, in its order: (transformed inputs (M, B, D), the training
        pass's dropout masks, the weights it computes with)."""
        for kind in self.kinds:
            if kind == "input_noise":
                x = self.noise.noisy_input(x)
            elif kind == "augmentation":
                x = self.augment(x)
            elif kind == PRETEXT:
                x = self.pretext.draw(x)
            else:
                x = self.adversarial(x, y, forward, weights, widths)
            if self.share is not None:  # an ensemble's models read one batch from here on
                x = self.share(x)
        return (x, *self.noise.forward_draws(x.shape[1], weights, widths))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's batch of (M, B, D) inputs augmented with its own draws."""
        m, b = x.shape[:2]
        image = len(self.input_shape) != 2
        drop = self.noise.drop
        gens = drop.generators if drop.exact else [drop.batched_gen] * m
        where = torch.device("cpu") if drop.exact else self.device  # member generators live on the CPU
        per = [draws(b, image, s, c, self.flip, where, x.dtype, g) for s, c, g in zip(self.shift, self.scale, gens)]
        pad = max(self.shift)
        if image:  # one padding for all: a member drawn with a smaller shift s crops pad − s further in
            for d, s in zip(per, self.shift):
                if "top" in d:
                    d["top"], d["left"] = d["top"] + (pad - s), d["left"] + (pad - s)
                elif pad:
                    d["top"] = d["left"] = torch.full((b,), pad, dtype=torch.long, device=where)
        stacked = {k: torch.cat([d[k] for d in per]).to(self.device) for k in per[0]}
        return augment(x.reshape(m * b, *self.input_shape), stacked, pad).reshape(x.shape)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor, forward: Forward, weights: List[torch.Tensor],
                    widths: List[int]) -> torch.Tensor:
        """The first round(mix·B) examples of each member replaced by their FGSM versions
        against the member's current weights, each with its own ε."""
        k = round(self.mix * x.shape[1])
        if k == 0 or not any(self.eps):
            return x
        drop = self.noise.drop
        idle = [g.get_state() if e == 0 else None for e, g in zip(self.eps, drop.generators)] if drop.exact else []
        masks, used = self.noise.forward_draws(k, weights, widths)
        for g, state in zip(drop.generators, idle):
            if state is not None:
                g.set_state(state)
        eps = torch.tensor(self.eps, device=x.device).view(-1, 1, 1)
        x_adv = self.attack(lambda xa: forward(xa, masks, used), x[:, :k], y[:, :k], eps)
        x_adv = torch.where(eps > 0, x_adv, x[:, :k])  # ε = 0: the lone run leaves its batch alone
        return torch.cat([x_adv, x[:, k:]], 1)
