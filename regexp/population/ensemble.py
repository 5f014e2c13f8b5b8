"""The ``ensemble`` regularizer in a population: each member's K models are K stacked slices.

A member with ``components`` = K owns K consecutive slices of the stacked model (slice
``k`` of member ``m`` is at ``m·K + k``), each initialized from the lone :class:`Ensemble`'s
model k (model 0 the run's own, model k built from ``member_seed(seed, k)``). The
slices are members of the :class:`Bucket` for everything that is elementwise per model: the
optimizer (each slice with its owner's lr and values), the penalties (their sum over the
owner's slices is the lone penalty over all of the Ensemble's parameters), and the loss,
whose sum over an owner's slices is the lone data loss Σₖ CEₖ (with ``bootstrap``, slice k's
per-example losses weighted by its owner's counts[k, idx]). Every slice of a member shares
its data order (identically seeded generators) and one transformed batch (input noise,
augmentation: the first slice's draw), and its dropout and noise generator (one
object: at each site the member's slices draw from it one after another), so a member
trains as its population of one does. Gradient clipping and SAM's ascent take one norm over
all of an owner's slices (``Bucket.owner``).

What the former per-model loop applied to the lone :class:`Ensemble` module as one model acts
here on each owner's slices together, with the same semantics: ``adversarial``'s FGSM perturbs
the owner's one batch by ε·sign of the input gradient of the cross-entropy of the Ensemble's
prediction ln((1/K) Σₖ softmax(zₖ)) (not of each model's own loss; :meth:`Owners.fgsm`), and
all K models train on that x'; ``tangent_prop`` penalizes J_x of that prediction
(:meth:`Owners.joint`); ``gradient_norm_penalty`` takes the norm over all K models' parameters,
in ``full`` mode of the gradient of Σₖ CEₖ (so Σₖ ‖∇θₖ CEₖ‖², each slice's own term) and in
``sgd`` mode of each micro-batch's cross-entropy of the Ensemble's prediction. Such a penalty's
value stands on the owner's first slice (zero on the others), so the per-run sum is the lone one.
``soft_weight_sharing`` has one mixture over all K models' weights (regexp/population/mixture.py;
under SAM counted once in its owner's ascent norm). ``transfer`` and reference ``parameter_tying``
match a saved model.pt to the lone Ensemble's names (``members.k.*``): model k starts from, and is
tied toward, the source's model k (each slice its share of the references: :func:`_slice_regs`).

The engine's one loop (engine.train_bucket) trains every run through a :class:`Runs` map;
:class:`Owners` is an ensemble's: what is per run is per owner, the training losses summed
over its slices, the evaluation on the ensemble's prediction ln((1/K) Σₖ softmax(zₖ)) (loss,
accuracy, best epoch, early stopping), the logs, ``model.pt`` / ``checkpoint.pt`` under the
Ensemble's own names (``members.k.*``), and the report, which the lone Ensemble module
computes on those weights. The probes measure each owner as the former loop measured its Ensemble
module: one model of all K slices' parameters whose output is that prediction
(:meth:`Owners.probe_forward`; the draws in the Ensemble's parameter order: probes/base.py ``MemberAxis``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.nn.functional as F

from regexp.errors import ConfigError
from regexp.population.compat import incompatibility
from regexp.population.member import Member
from regexp.population.runs import Runs
from regexp.regularizers.adversarial import fgsm

if TYPE_CHECKING:
    from regexp.population.engine import Bucket


def components(cfg) -> int:
    """How many slices each run of ``cfg`` owns: an ensemble's K models, else 1."""
    if "ensemble" not in cfg.regularizer:
        return 1
    why = incompatibility(cfg)  # a sweep's population reaches here only through its own check
    if why is not None:
        raise ConfigError(f"the population cannot train this ensemble: {why}")
    return int(cfg.regularizer.ensemble.components)


class Bagging:
    """Each slice's per-example losses weighted by its owner's bootstrap counts, as the lone
    run's data loss: mean over the batch of counts[k, idx]·CE (label smoothing per slice)."""

    def __init__(self, counts: torch.Tensor, eps: torch.Tensor):
        self.counts, self.eps = counts, eps  # (S, n) per slice, (S, 1)
        self.idx: Optional[torch.Tensor] = None  # (S, B): the step's positions in each training set

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), -1)
        nll = -logp.gather(2, y.unsqueeze(2)).squeeze(2)
        per = (1 - self.eps) * nll + self.eps * (-logp.sum(2) / logp.shape[2])
        return (self.counts.gather(1, self.idx) * per).mean(1)

    def keep(self, sel: torch.Tensor) -> None:
        self.counts, self.eps = self.counts.index_select(0, sel), self.eps.index_select(0, sel)


class Owners(Runs):
    """Member m owns slices ``m·K .. m·K + K − 1``, its Ensemble's models in order."""

    def __init__(self, members: List[Member], k: int):
        super().__init__(members)
        self.k = k

    def slice_members(self) -> List[Member]:
        return _slice_members(self.members, self.k)

    def attach(self, b: "Bucket") -> None:
        """The bucket's per-owner parts: the clipping groups, the shared batch, bagging's weights."""
        super().attach(b)
        b.owner = self.index(b.device)
        b.transforms.attack = self.fgsm
        if any(r in self.members[0].cfg.regularizer for r in ("input_noise", "augmentation")):
            b.shared_input = b.transforms.share = self.share
        regs = [_reg(m) for m in self.members]
        if regs[0].counts is not None:
            counts = torch.cat([r.counts for r in regs]).to(b.device)
            smooth = [m.cfg.regularizer.get("label_smoothing") for m in b.members]
            eps = torch.tensor([0.0 if c is None else float(c.eps) for c in smooth], device=b.device)
            b.bagging = Bagging(counts, eps.view(-1, 1))

    def index(self, device: torch.device) -> torch.Tensor:
        return torch.arange(len(self.members) * self.k, device=device) // self.k

    def per_run(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(len(self.members), self.k, *t.shape[1:]).sum(1)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """ln of the mean of the K models' probabilities: the lone Ensemble's prediction."""
        lp = F.log_softmax(z, 1).view(len(self.members), self.k, *z.shape[1:])
        return torch.logsumexp(lp, 1) - math.log(self.k)

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        return y[::self.k]

    def prediction(self, z: torch.Tensor) -> torch.Tensor:
        """(S, B, C) training logits → (M, B, C): each owner's Ensemble output, ln of the mean of
        its K models' probabilities, differentiable in every slice."""
        lp = F.log_softmax(z, -1).view(len(self.members), self.k, *z.shape[1:])
        return torch.logsumexp(lp, 1) - math.log(self.k)

    def probe_forward(self, forward):
        """(M, B, ...) inputs → (M, B, C): each owner's Ensemble prediction, its K slices reading its
        rows, as the former loop's probes measured the Ensemble module (all K models' parameters one
        vector, this prediction the output their loss and margins read)."""
        return lambda x: self.prediction(forward(x.repeat_interleave(self.k, 0)))

    def spread(self, t: torch.Tensor) -> torch.Tensor:
        """(M, ...) per owner → (S, ...): on each owner's first slice, zero (a constant) on the
        others, so a per-slice sum over an owner's slices is the owner's value."""
        rest = t.new_zeros(t.shape[0], self.k - 1, *t.shape[1:])
        return torch.cat([t.unsqueeze(1), rest], 1).reshape(-1, *t.shape[1:])

    def joint(self, forward):
        """The Ensemble's output as a batch penalty differentiates it (tangent_prop's J_x f, the
        sgd mode's micro-batch losses of gradient_norm_penalty): each owner's prediction on its
        first slice. Its slices read one batch, so ∂/∂x of the owner's output summed over its
        slices' copies of x is the lone Ensemble's input gradient."""
        return lambda x: self.spread(self.prediction(forward(x)))

    def fgsm(self, forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """FGSM against each owner's Ensemble, as the lone run's ``fgsm(model, ...)``: the sign of
        the input gradient of the cross-entropy of its prediction ln((1/K) Σₖ softmax(zₖ)) on its
        one batch (the gradients through its K slices' copies summed), the same x' for every slice."""
        k = self.k
        own = lambda xm: self.prediction(forward(xm.repeat_interleave(k, 0)))  # noqa: E731
        return fgsm(own, x[::k], y[::k], eps[::k]).repeat_interleave(k, 0)

    def share(self, x: torch.Tensor) -> torch.Tensor:
        """(S, ...) → (S, ...): every slice gets its owner's first slice's rows (the one noisy or
        augmented batch a lone Ensemble's K models all read; the other slices' draws are dropped)."""
        m, k = len(self.members), self.k
        return x.view(m, k, *x.shape[1:])[:, :1].expand(m, k, *x.shape[1:]).reshape(x.shape)

    def state(self, b: "Bucket", i: int, tensors=None) -> Dict[str, torch.Tensor]:
        """Member i's slices as the Ensemble's state_dict (``members.k.*``)."""
        return {f"{self.prefix(j)}{n}": t for j, s in enumerate(self.slices(i))
                for n, t in b.net.member_state(s, tensors).items()}

    def prefix(self, j: int) -> str:
        return f"members.{j}."

    @contextmanager
    def checkpointing(self, b: "Bucket", i: int, running: Optional[torch.Tensor]):
        """The owner's data order (its slices drew the same orders) and its slices' own loss sums,
        in the regularizer's state, so a resumed epoch sums per slice as the uninterrupted one."""
        m, sl = self.members[i], self.slices(i)
        m.order.set_state(b.members[sl[0]].order.get_state())
        _reg(m).running = running[sl[0]:sl[-1] + 1].cpu() if running is not None else None
        try:
            yield
        finally:
            _reg(m).running = None

    def keep(self, b: "Bucket", kept: List[int]) -> List[int]:
        sl = super().keep(b, kept)
        b.owner = self.index(b.device)
        if b.bagging is not None:
            b.bagging.keep(torch.tensor(sl, device=b.device))
        return sl


def _slice_members(owners: List[Member], k: int) -> List[Member]:
    """The Bucket's members: each owner's K models, sharing its config, dropout generator and
    regularizers; each slice its own copy of the owner's data order (they draw the same orders)."""
    out = []
    for m in owners:
        for j, model in enumerate(m.model.members):
            order = torch.Generator()
            order.set_state(m.order.get_state())
            s = Member(m.point, m.cfg, m.out_dir, m.overrides, model=model, dropout_gen=m.dropout_gen,
                       order=order, regs=_slice_regs(m, j), plain=m.plain, resume=_slice_resume(m, j, k, model))
            out.append(s)
    return out


def _slice_regs(m: Member, j: int) -> List:
    """Slice j's regularizers: its owner's objects, but reference tying's as model j of the Ensemble
    sees it (the references the lone run matched to ``members.j.*``: each model tied to the
    reference's model j, as the former loop tied the Ensemble's parameters by name)."""
    return [r.within(f"members.{j}.") if r.name == "parameter_tying" else r for r in m.regs]


def _slice_resume(m: Member, j: int, k: int, model) -> Optional[Dict]:
    """What engine._restore reads of slice j's checkpoint, cut from its owner's."""
    ck = m.resume
    if ck is None:
        return None
    n = sum(1 for p in model.parameters() if p.requires_grad)
    state = ck["optimizer"]["state"]
    prefix = f"members.{j}."
    best = ck["best_state"]
    reg = _reg(m)
    if reg.running is not None:
        running = reg.running[j]
    else:  # a checkpoint without per-slice sums: its one sum goes to the first slice (the owner sums them)
        running = ck["running"] if j == 0 else torch.zeros_like(ck["running"])
    return {"epoch": ck["epoch"], "step_in_epoch": ck["step_in_epoch"], "scheduler": ck["scheduler"],
            # its model's entries, then the regularizers' groups (the one mixture) as its own
            "optimizer": {"state": {**{i: state[j * n + i] for i in range(n) if j * n + i in state},
                                    **{n + e - k * n: state[e] for e in state if e >= k * n}}},
            "best_state": None if best is None else {key[len(prefix):]: v for key, v in best.items()
                                                     if key.startswith(prefix)},
            "perm": ck["perm"], "running": running}


def _reg(m: Member):
    return next(r for r in m.regs if r.name == "ensemble")
