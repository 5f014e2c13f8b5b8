"""Parameter tying (Goodfellow et al., Deep Learning §7.9): pull the weights toward those of
another model, Ω = λ‖w − w_ref‖² summed over the tied tensors, so ∂Ω/∂w = 2λ(w − w_ref).

Two modes (``mode``), one formula (:func:`tying_penalty`):

- ``reference``: the other model is a finished run's ``model.pt`` (``run_dir``); its tensors are
  tied to this model's parameters of the same name and shape, the others (a head for another
  number of classes) train freely. With ``transfer`` (``freeze=false``) as well, the model also
  starts at the reference: the penalty then keeps fine-tuning near the source weights instead
  of toward zero, the "L2-SP" of Li, Grandvalet & Davis (2018). In a population each member is
  tied to the reference through :meth:`ParameterTying.penalty_of` on the stacked weights.
- ``joint``: Goodfellow's setting, two models trained together. A partner of the same
  architecture trains in the same run on its own data (the run's data config with
  ``partner_data`` overriding keys, e.g. more examples or other label noise), each step on its
  own batch: loss = CE_A(batch_A) + CE_B(batch_B) + λ‖w_A − w_B‖², so A's tied tensors get
  2λ(w_A − w_B) and B's −2λ(w_A − w_B). The run's model (evaluated, saved as ``model.pt``) is A;
  the partner is saved beside it as ``partner_model.pt``, its accuracy in ``metrics.json``'s
  ``extra``. The term logged as ``penalty/parameter_tying`` is then CE_B + λ‖w_A − w_B‖² (all
  that the partner adds to the loss). The partner is a plain model: the run's other
  regularizers (dropout, noise, weight decay, gradient clipping) act on A only; the optimizer's
  own weight decay acts on both. In a population each member's regularizer builds, logs,
  reports and checkpoints its partner as here, while regexp/population/partner.py trains the
  members' partners stacked.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from regexp.errors import ConfigError
from regexp.regularizers.base import Regularizer, member_sum, register
from regexp.regularizers.transfer import matching_tensors

log = logging.getLogger("regexp")
KEY = "regularizer.parameter_tying"
MODES = ("reference", "joint")
PARTNER_FILE = "partner_model.pt"


def tying_penalty(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]], lam, stacked: bool,
                  tied: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """λ Σ ‖w − w_ref‖² over the (w, w_ref) pairs: one value for a lone model, one per member for
    stacked tensors (leading dimension: the member; ``lam`` (M,), and ``tied[j]`` (M,) 1 where
    member m ties tensor j, 0 where its shape differs from the reference's)."""
    terms = [member_sum((w - r).pow(2), stacked) for w, r in pairs]
    if tied is not None:
        terms = [t * s for t, s in zip(tied, terms)]
    return lam * sum(terms)


@register
class ParameterTying(Regularizer):
    name = "parameter_tying"

    @dataclass
    class Config:
        lam: float = 0.01
        mode: str = "reference"  # reference: toward run_dir's weights; joint: with a partner model
        run_dir: str = ""  # reference mode: folder of a finished run, whose weights are the reference
        file: str = "model.pt"  # or best_model.pt
        exclude_bias_and_norm: bool = False  # true: tie the weight matrices only (tensors of 2+ dims)
        # joint mode: keys of the data config that differ for the partner's task (+KEY.partner_data.n_train=...)
        partner_data: Dict[str, Any] = field(default_factory=dict)
        partner_batch_size: Optional[int] = None  # None: the run's batch size
        partner_seed: Optional[int] = None  # the partner's initialization and data order; None: from seed

    ranges = {"lam": (lambda v: v >= 0, "a number >= 0"),
              "mode": (lambda v: v in MODES, "one of " + ", ".join(MODES)),
              "partner_batch_size": (lambda v: v is None or v >= 1, "an integer >= 1, or null (the run's)")}

    @classmethod
    def validate(cls, cfg, prefix: str) -> None:
        from regexp.config import DataConfig

        super().validate(cfg, prefix)
        if cfg.mode == "reference" and not cfg.run_dir:
            raise ConfigError(f"{prefix}.run_dir='' is invalid: expected the folder of a finished run (holding "
                              f"{cfg.file}) with {prefix}.mode=reference, or {prefix}.mode=joint")
        known = [f for f in DataConfig.__dataclass_fields__ if f != "root"]
        bad = [k for k in cfg.partner_data if k not in known]
        if bad:
            raise ConfigError(f"{prefix}.partner_data.{bad[0]} is not a key of data: expected one of "
                              + ", ".join(known))
        if cfg.partner_data and cfg.mode != "joint":
            raise ConfigError(f"{prefix}.partner_data is set with {prefix}.mode={cfg.mode}: expected mode=joint")

    def _tied(self, params: Dict[str, torch.Tensor], names: Iterable[str]) -> List[str]:
        return sorted(n for n in names if params[n].dim() >= 2 or not self.cfg.exclude_bias_and_norm)

    def attach(self, model) -> None:
        own = dict(model.named_parameters())  # buffers (batch-norm statistics) are not weights
        if self.cfg.mode == "joint":
            self.partner = self._build_partner()
            other = dict(self.partner.named_parameters())
            self.tied = self._tied(own, [n for n in own if n in other and other[n].shape == own[n].shape])
            self.pairs = [(own[k], other[k]) for k in self.tied]
            where = "the partner"
        else:
            self.partner = None
            ref = matching_tensors(self.cfg.run_dir, self.cfg.file, own, KEY)
            self.tied = self._tied(own, ref)
            # by name, for the population's stacked references (penalty_of)
            self.reference = {k: ref[k].to(own[k].device, own[k].dtype) for k in self.tied}
            # an untied tensor's reference in a population: zeros of its shape (any stacked model pads it)
            self.shapes = {k: p.shape for k, p in own.items()}
            self.pairs = [(own[k], self.reference[k]) for k in self.tied]
            where = f"{self.cfg.run_dir}/{self.cfg.file}"
        if not self.tied:
            raise ConfigError(f"{KEY}: no parameter to tie ({where} shares no tensor of matching name and shape "
                              "with this model that exclude_bias_and_norm keeps)")
        self.free = sorted(set(own) - set(self.tied))
        log.info("parameter_tying: %d tensors tied to %s (%s); free: %s", len(self.tied), where,
                 ", ".join(self.tied), ", ".join(self.free) or "none")

    # ---------------------------------------------------------------- the penalty
    @classmethod
    def penalty_of(cls, params, hp, stacked: bool) -> torch.Tensor:
        """``hp.ref``: the reference of each of ``params`` (stacked and zero-padded like them in a
        population, where padded units tie 0 to 0); ``hp.tied``, when present, which members tie it."""
        return tying_penalty(zip(params, hp.ref), hp.lam, stacked, getattr(hp, "tied", None))

    @classmethod
    def population_hp(cls, regs: Sequence["ParameterTying"], named: Sequence[Tuple[str, torch.Tensor]],
                      stack) -> Dict[str, Any]:
        """The stacked references for :meth:`penalty_of`: ``named`` are the (name, stacked tensor)
        pairs it will get, ``stack(per_member, like)`` pads each member's tensor into ``like``."""
        ref, tied = [], []
        for name, like in named:
            per = [r.reference.get(name) for r in regs]
            ref.append(stack([t if t is not None else like.new_zeros(r.shapes[name]) for t, r in zip(per, regs)],
                             like))
            tied.append(torch.tensor([float(t is not None) for t in per], device=like.device))
        return {"ref": ref, "tied": tied}

    def within(self, prefix: str) -> "ParameterTying":
        """This reference-mode tying as one submodule of the model sees it (a population's slice of
        an Ensemble, ``members.k.``): the references and shapes under ``prefix``, named as the
        submodule names them; the penalties of all the submodules add up to this one's."""
        part = copy.copy(self)
        cut = lambda d: {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}  # noqa: E731
        part.reference, part.shapes = cut(self.reference), cut(self.shapes)
        return part

    # ---------------------------------------------------------------- joint mode: the partner
    def _build_partner(self) -> nn.Module:
        from omegaconf import OmegaConf

        from regexp.data import load_data
        from regexp.models import build_model
        from regexp.regularizers.ensemble import member_seed
        from regexp.train.trainer import rng_state, set_rng_state

        ctx = self.ctx
        if ctx.model_cfg is None or ctx.data_cfg is None:
            raise ConfigError(f"{KEY}.mode=joint needs the run's model and data configs (a trainer run)")
        seed = self.cfg.partner_seed if self.cfg.partner_seed is not None else member_seed(ctx.seed, 1)
        state = rng_state()  # the run's own draws (A's dropout, noise ...) stay those of a lone run
        try:
            data_cfg = OmegaConf.merge(ctx.data_cfg, self.cfg.partner_data)
            self.data = load_data(data_cfg, ctx.seed)
            if self.data.num_classes != ctx.num_classes or self.data.input_shape != ctx.input_shape:
                log.info("parameter_tying: the partner's task has %d classes, inputs %s", self.data.num_classes,
                         self.data.input_shape)
            torch.manual_seed(seed)
            partner = build_model(ctx.model_cfg, self.data.input_shape, self.data.num_classes).to(ctx.device)
        finally:
            set_rng_state(state)
        self.x, self.y = (t.to(ctx.device) for t in self.data.split("train"))
        self.order = torch.Generator().manual_seed(seed)
        self.perm: Optional[torch.Tensor] = None
        self.step = 0  # position in the partner's epoch
        self.sums = torch.zeros(2, device=ctx.device)  # the epoch's partner loss and examples
        return partner

    def param_groups(self) -> List[dict]:
        return [{"params": list(self.partner.parameters())}] if self.cfg.mode == "joint" else []

    @torch.no_grad()
    def distance(self) -> float:
        return math.sqrt(sum((w - r).pow(2).sum() for w, r in self.pairs).item())

    def log(self, writer, epoch: int) -> None:
        if self.cfg.mode == "joint":
            loss, n = self.sums.tolist()
            self.sums.zero_()
            writer.scalars({"parameter_tying/partner_train_running_loss": loss / max(n, 1.0),
                            "parameter_tying/distance_to_partner": self.distance()}, epoch)

    def report(self, model, tensors, evaluate) -> Dict[str, float]:
        out = {"parameter_tying/tied_tensors": len(self.tied), "parameter_tying/free_tensors": len(self.free),
               "parameter_tying/tied_params": sum(r.numel() for _, r in self.pairs)}
        if self.cfg.mode != "joint":
            return {**out, "parameter_tying/distance_to_reference": self.distance()}
        out["parameter_tying/distance_to_partner"] = self.distance()
        for split in ("train", "val", "test"):  # the partner on its own task's splits
            x, y = self.data.split(split)
            if len(y):
                loss, acc = evaluate(self.partner.eval(), x.to(self.ctx.device), y.to(self.ctx.device))
                out[f"parameter_tying/partner_{split}_acc"] = acc.item()
                out[f"parameter_tying/partner_{split}_loss"] = loss.item()
        if self.ctx.out_dir is not None:
            from regexp.train.io import save_torch

            save_torch(self.ctx.out_dir / PARTNER_FILE, self.partner.state_dict())
        return out

    def state_dict(self) -> Dict[str, Any]:
        if self.cfg.mode != "joint":
            return {}
        return {"partner": self.partner.state_dict(), "order": self.order.get_state(),
                "perm": None if self.perm is None else self.perm.cpu(), "step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.cfg.mode == "joint":
            self.partner.load_state_dict(state["partner"])
            self.order.set_state(state["order"])
            self.perm = None if state["perm"] is None else state["perm"].to(self.x.device)
            self.step = state["step"]
