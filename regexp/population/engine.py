"""The training loop: a bucket of population members trained as one batched computation.

Every run trains here; a lone run is a population of one member (``regexp.train.trainer.train``
accepts its folder, then calls ``train_lone``). Each member gets its own batches in its own
order, its loss and penalties, update rule and schedule, per-epoch evaluation, logs and
divergence check; only the arithmetic is batched (one ``baddbmm`` per layer for all members),
so a member ends with its lone run's weights up to float32 rounding: summation order inside
the batched products differs, nothing else.
For relu MLPs without a penalty or label smoothing the gradient is written out by hand
(``StackedMLP.manual_step``: the same products autograd runs, without its bookkeeping).

The step loop never reads a value back to the host; losses are summed on the device and read
once per epoch, when a member whose loss is no longer finite is marked ``diverged``, written
out, and dropped from the stacked tensors while the others go on.

The stacked tensors hold slices; a run owns one slice, or K (an ensemble's models,
``regexp/population/ensemble.py``). The step loop is per slice; everything after an epoch
(evaluation, logs, stopping, checkpoints, final files, who stays) is per run, through the
bucket's owner map ``Bucket.runs`` (``regexp/population/runs.py``), the identity for a run of one.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from regexp.errors import ConfigError
from regexp.optim.sam import ascended_gradient
from regexp.population.aux_heads import StackedHeads
from regexp.population.compat import MEMBER_KEYS
from regexp.population.data import SPLITS, PopulationData, data_key
from regexp.population.dropout import MemberDropout
from regexp.population.ensemble import Owners, components
from regexp.population.mixture import StackedMixtures, stacked_mixtures
from regexp.population.member import Member, checkpoint_dict, finish, finite, write_histograms, write_scalars
from regexp.population.noise import StepNoise
from regexp.population.partner import StackedPartners, stacked_partners
from regexp.population.optim import ADAPTIVE, StackedOptimizer
from regexp.population.pretext import MemberPretext
from regexp.population.runs import Runs
from regexp.population import tuning
from regexp.population.schedule import Factor, Schedule
from regexp.population.stacked_cnn import StackedCNN
from regexp.population.stacked_gru import StackedGRU
from regexp.population.stacked_mlp import StackedMLP
from regexp.population.stacked_transformer import StackedTransformer
from regexp.population.transforms import BatchTransforms
from regexp.probes.base import ProbeInputs
from regexp.probes.runner import Probes, build_probes, record as probe_record
from regexp.regularizers.base import Batch
from regexp.regularizers.decoupled_weight_decay import DecoupledWeightDecay
from regexp.train.io import save_torch
from regexp.train import signals
from regexp.train.signals import StopFlag
from regexp.train.sparsity import KEYS as SPARSITY_KEYS

log = logging.getLogger("regexp.population")
EVAL_BYTES = 2**20  # one evaluation chunk's hidden activations: cache-sized, no page faults
EVAL_BLOCK = 8192  # evaluation rows per member whose logits are reduced at once
EVAL_LOOP_BYTES = 2**20  # member by member (wide buckets): one member's chunk stays in L2


@dataclass
class Options:
    """How populations are formed and run (``extra.population.*`` in a sweep's config)."""
    bucket_ratio: float = 1.5  # cost (multiply-adds per example) of the widest / the narrowest in a bucket
    # widths up to this always share a bucket (their steps are overhead-bound); None: the
    # model's own (SMALL_WIDTH)
    small_width: Optional[int] = None
    bf16: bool = False  # autocast the forward pass to bfloat16 (GPU; breaks the exactness)
    compile: bool = False  # torch.compile the forward pass
    # On CPU, buckets at least this wide compute member by member inside the batched step
    # (plain GEMMs instead of batched ones); 0: never; None or "auto": whichever form of the
    # bucket's step is faster on this machine, measured once and cached (population/tuning.py).
    loop_width: Optional[Union[int, str]] = None
    exact_dropout: Optional[bool] = None  # None: exact (lone-run) masks on CPU, batched on GPU
    workers: Union[int, str] = "auto"  # processes the buckets spread over (population/workers.py)


# An MLP step up to width 32 costs its dispatch, not its products, so such widths share a
# bucket. A CNN's or Transformer's step is arithmetic-bound already at its smallest widths
# (convolutions over every position, attention over every token), so padding a narrow member
# to a wider one only adds work: on the loaded 2-core Xeon, one bucket per width made the CNN
# bench sweep's population 1.3x faster and the Transformer's 1.27x (README, Benchmarks).
SMALL_WIDTH = {"mlp": 32}


def small_for(opts: Options, model: str) -> int:
    """The width up to which ``model``'s members share a bucket regardless of cost."""
    return opts.small_width if opts.small_width is not None else SMALL_WIDTH.get(model, 0)


def _base_name(opt_cfg) -> str:
    """The update rule: SAM's base optimizer, or the optimizer itself."""
    return opt_cfg.base if opt_cfg.name == "sam" else opt_cfg.name


def _member_hypers(members: List[Member]) -> Dict[str, List[float]]:
    o = [m.cfg.optimizer for m in members]
    if _base_name(o[0]) in ("adam", "adamw"):
        return {"lr": [c.lr for c in o], "beta1": [c.beta1 for c in o], "beta2": [c.beta2 for c in o],
                "eps": [c.eps for c in o], "weight_decay": [c.weight_decay for c in o]}
    if o[0].name in ADAPTIVE:  # each rule's own keys, as its config names them
        keys = {"adagrad": ("eps", "initial_accumulator_value"), "rmsprop": ("alpha", "eps", "momentum"),
                "adadelta": ("rho", "eps")}[o[0].name]
        return {"lr": [c.lr for c in o], **{k: [c[k] for c in o] for k in keys}}
    return {"lr": [c.lr for c in o], "momentum": [c.momentum for c in o],
            "dampening": [c.dampening for c in o]}


def _amsgrad(cfg) -> bool:
    """Adam's amsgrad, shared by the members (it adds a state tensor); every optimizer group of a
    lone run's one torch optimizer (multi_task's head, the learned mixture) takes it too."""
    return bool(cfg.optimizer.get("amsgrad", False))


def _reg(m: Member, name: str, key: str, default: float = 0.0) -> float:
    r = m.cfg.regularizer.get(name)
    return float(r[key]) if r is not None else default


class LossTerms:
    """Per-member cross-entropy (with label smoothing) and weight-decay penalty, as (M,) tensors."""

    def __init__(self, members: List[Member], device: torch.device, net: StackedMLP,
                 stacked: Optional[Dict[str, Callable[[StackedMLP], torch.Tensor]]] = None):
        # ``stacked``: penalties whose stacked form needs per-member state (learned mixtures)
        self.stacked = stacked or {}
        # As in train(): only regularizers that define a penalty add a term (and a curve).
        self.reg_names = [r.name for r in members[0].regs if r.penalizes()]
        eps = [_reg(m, "label_smoothing", "eps") for m in members]
        self.eps_common = eps[0] if all(e == eps[0] for e in eps) else None
        self.eps = torch.tensor(eps, device=device).view(-1, 1)
        # Each penalty is its regularizer's own penalty_of (or batch_penalty_of), on the stacked
        # weights, with each numeric value as an (M,) float32 tensor (float32(λ)·Σ, as train()'s
        # float λ gives); a value members must share stays as the config has it.
        self.forms = {}
        for r in members[0].regs:
            if r.penalizes():
                cfgs = [m.cfg.regularizer[r.name] for m in members]
                hp = {k: torch.tensor([float(c[k]) for c in cfgs], device=device) if isinstance(v, float)
                      and f"regularizer.{r.name}.{k}" in MEMBER_KEYS else v for k, v in cfgs[0].items()}
                biases = not cfgs[0].get("exclude_bias_and_norm", True)
                if r.population_hp is not None and r.name not in self.stacked:  # tying's references
                    hp.update(r.population_hp([next(x for x in m.regs if x.name == r.name) for m in members],
                                              _penalized(net, biases), net.stack))
                self.forms[r.name] = (type(r), SimpleNamespace(**hp), biases)
        # activity penalties: member 0's regularizer (attached to its lone model, which fixed
        # what the activation shared by all members needs) applies its formula to all members
        self.activity = {r.name: r for r in members[0].regs if r.penalizes() and r.activity_of is not None}
        self.heads: Optional[StackedHeads] = None  # multi_task's (set by the Bucket)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m, b, c = logits.shape
        flat, yf = logits.reshape(m * b, c).float(), y.reshape(-1)
        if self.eps_common == 0.0:
            return nll_rows(flat, yf).view(m, b).mean(1)
        if self.eps_common is not None:
            per = F.cross_entropy(flat, yf, reduction="none", label_smoothing=self.eps_common)
            return per.view(m, b).mean(1)
        logp = F.log_softmax(flat, -1).view(m, b, c)
        nll = -logp.gather(2, y.unsqueeze(2)).squeeze(2)
        smooth = -logp.sum(2) / c
        return ((1 - self.eps) * nll + self.eps * smooth).mean(1)

    def penalties(self, net: StackedMLP, like: torch.Tensor, batch: Optional[Batch] = None) -> List[torch.Tensor]:
        """One (M,) tensor per penalizing regularizer, in config order (``batch``: the step, for
        the batch penalties)."""
        out = []
        for name in self.reg_names:
            if name in self.stacked:
                out.append(self.stacked[name](net))
                continue
            cls, hp, biases = self.forms[name]
            if name in self.stacked:
                out.append(self.stacked[name](net))
                continue
            if name in self.activity:  # on the hidden activations the forward just recorded
                out.append(self.activity[name].activity_of(net.hidden, hp, True, net.site_units))
                continue
            if name == "multi_task":  # on the features the output layer reads
                out.append(self.heads.term(net.head_input, hp))
                continue
            if cls.batch_penalty_of is not None:
                out.append(cls.batch_penalty_of(batch, hp, True))
                continue
            out.append(cls.penalty_of([p for _, p in _penalized(net, biases)], hp, True))
        return out


def _penalized(net: StackedMLP, biases: bool) -> List[Tuple[str, torch.Tensor]]:
    """(name, stacked tensor) of the parameters a weight penalty sees: the weights, and the
    biases unless the regularizer's exclude_bias_and_norm leaves them out."""
    # a frozen tensor (transfer's freeze) has no penalty
    return [(name, p) for name, p, is_w in net.named_params() if (is_w or biases) and p.requires_grad]


def nll_rows(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, y, reduction="none")`` for (N, C) logits, bitwise: log-softmax
    over the classes laid out as (C, N), where torch's CPU kernel runs vectorized across rows
    (over a dimension of C = 10 contiguous classes it is several times slower)."""
    lp = F.log_softmax(logits.t().contiguous(), 0)
    return -lp.gather(0, y.view(1, -1)).view(-1)


def hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(1) == y`` for class-major (M, C, N) logits, as (M, N) booleans.

    argmax over a strided dimension is ~100x slower on CPU than amax over it, so: the label
    is predicted when its logit is the maximum, except on ties, where argmax picks the first
    maximal class; the (rare) tied columns are settled with argmax itself.
    """
    at_top = logits == logits.amax(1, keepdim=True)
    hit = at_top.gather(1, y.unsqueeze(1)).squeeze(1)
    tied = at_top.view(torch.uint8).sum(1, dtype=torch.uint8) > 1
    if bool(tied.any()):
        m, n = tied.nonzero(as_tuple=True)
        hit[m, n] = logits[m, :, n].argmax(1) == y[m, n]
    return hit


@torch.no_grad()
def evaluate_members(net: StackedMLP, runs: Runs, x: torch.Tensor, y: torch.Tensor, batch: int,
                     counts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy of every run on its slices' (N, D) inputs, as (M,) tensors,
    of the prediction its slices' logits make (``counts``: see :meth:`StackedMLP.eval_logits`)."""
    y = runs.labels(y)
    m, n = y.shape
    loss = torch.zeros(m, device=x.device)
    correct = torch.zeros(m, device=x.device)
    # rows whose logits are reduced together (member by member: many cache-sized chunks)
    block = max(batch, EVAL_BLOCK) if net.loop else batch
    for j in range(0, n, block):
        logits = runs.logits(net.eval_logits(x[:, j:j + block], batch, counts).float())  # (M, C, rows)
        yb = y[:, j:j + block]
        lp = F.log_softmax(logits, 1)  # over C, vectorized across the rows (see nll_rows)
        loss -= lp.gather(1, yb.unsqueeze(1)).sum((1, 2))
        correct += hits(logits, yb).sum(1)
    return loss / max(n, 1), correct / max(n, 1)


class Bucket:
    """The stacked state of the members (slices) still training in one bucket, and the runs
    that own them (``runs``: slice i is run i, unless an ensemble's Owners attach)."""

    # an ensemble's (regexp/population/ensemble.py): the owning run of each slice, whose slices
    # clip under one norm, and bagging's per-example weights of the loss
    owner: Optional[torch.Tensor] = None
    bagging = None
    shared_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # its K models see one batch

    def __init__(self, members: List[Member], width: int, data: PopulationData, device: torch.device,
                 opts: Options):
        self.members, self.data, self.device = members, data, device
        self.runs = Runs(members)
        cfg = members[0].cfg
        # batched until train_bucket knows the step's path (tuning.choose_loop decides then)
        if cfg.model.name == "cnn":
            self.net = StackedCNN([m.model for m in members], [m.width for m in members], width,
                                  data.input_shape, device)
        elif cfg.model.name == "transformer":
            self.net = StackedTransformer([m.model for m in members], [m.width for m in members], width,
                                          data.input_shape, device)
        elif cfg.model.name == "gru":
            self.net = StackedGRU([m.model for m in members], [m.width for m in members], width,
                                  data.input_shape, device)
        else:
            self.net = StackedMLP([m.model for m in members], [m.width for m in members], width,
                                  cfg.model.activation, device, False)
        if "parameter_tying" in cfg.regularizer and any(n != self.net.member_names[0] for n in self.net.member_names):
            raise ConfigError("regularizer.parameter_tying: members of one population name their parameters "
                              "differently (model.residual=true with a first-layer skip for some only), so their "
                              "references cannot be matched by name; use sweep.engine=serial")
        self.frozen = frozen_names(members)
        freeze_(self.net, self.frozen)
        self.opt = StackedOptimizer(_base_name(cfg.optimizer), self.trainable, _member_hypers(members),
                                    bool(cfg.optimizer.get("nesterov", False)), device,
                                    bool(cfg.optimizer.get("centered", False)), _amsgrad(cfg))
        # SAM (regexp/optim/sam.py): each member's own radius and gradient norm
        self.sam = cfg.optimizer.name == "sam"
        self.schedule: Optional[Schedule] = None  # set by train_bucket, kept with the members
        self.rho = torch.tensor([float(m.cfg.optimizer.rho) for m in members], device=device) if self.sam else None
        self.eta = torch.tensor([float(m.cfg.optimizer.eta) for m in members], device=device) if self.sam else None
        # soft weight sharing: each member's mixture, a second optimizer group of its own
        self.mixtures: Optional[StackedMixtures] = stacked_mixtures(
            members, self.net, _base_name(cfg.optimizer), _member_hypers(members),
            bool(cfg.optimizer.get("nesterov", False)), bool(cfg.optimizer.get("centered", False)), device,
            _amsgrad(cfg))
        # joint parameter tying: each member's partner model, a further optimizer group of its own
        self.partners: Optional[StackedPartners] = stacked_partners(
            members, self.net, width, lambda ps: StackedOptimizer(
                _base_name(cfg.optimizer), ps, _member_hypers(members), bool(cfg.optimizer.get("nesterov", False)),
                device, bool(cfg.optimizer.get("centered", False)), _amsgrad(cfg)), device)
        self.terms = LossTerms(members, device, self.net, self._stacked_penalties())
        self.eval_bytes: Optional[int] = None  # the evaluation chunk's budget, chosen at the first evaluation
        if opts.compile and any(f[0].batch_penalty_of is not None for f in self.terms.forms.values()):
            raise ConfigError("extra.population.compile=true is invalid with tangent_prop or gradient_norm_penalty "
                              "(torch.compile has no double backward): expected false")
        self.heads = _heads(members, self.net, cfg, device)
        self.terms.heads = self.heads
        self.net.record = bool(self.terms.activity) or self.heads is not None
        exact = opts.exact_dropout if opts.exact_dropout is not None else device.type == "cpu"
        sizes, padded = self.net.site_sizes  # the hidden dropout sites' units per example
        self.drop = MemberDropout([_reg(m, "dropout", "input_p") for m in members],
                                  [_reg(m, "dropout", "p") for m in members],
                                  [m.dropout_gen for m in members], sizes,
                                  int(torch.tensor(data.input_shape).prod()), padded,
                                  len(self.net.site_weights) - 1, device, exact, int(cfg.seed),
                                  self.net.site_weights)
        self.noise = _step_noise(members, self.drop, self.net, device)
        self.pretext = MemberPretext.of(members, data.input_shape, device)
        self.transforms = BatchTransforms([m.cfg.regularizer for m in members], data.input_shape, self.noise, device,
                                          self.pretext)
        self.member_set = data.member_set.clone()
        self.best: Optional[List[torch.Tensor]] = None
        dwd = [m.cfg.regularizer.get("decoupled_weight_decay") for m in members]
        self.decoupled = (torch.tensor([float(c.lam) for c in dwd], dtype=torch.float64, device=device),
                          not dwd[0].exclude_bias_and_norm) if dwd[0] is not None else None
        clip = [m.cfg.trainer.grad_clip for m in members]  # None: that member never clips
        self.clip = (torch.tensor([math.inf if c is None else float(c) for c in clip], device=device)
                     if any(c is not None for c in clip) else None)
        self.forward = torch.compile(self.net.forward) if opts.compile else self.net.forward
        self.probes: Optional[Probes] = None  # the runs' (attach_probes), once they are known

    def _stacked_penalties(self) -> Dict[str, Callable[[StackedMLP], torch.Tensor]]:
        forms = {"soft_weight_sharing": self.mixtures, "parameter_tying": self.partners}
        return {name: g.penalty for name, g in forms.items() if g is not None}

    def zero_grad(self) -> None:
        """Every optimizer group's gradients, as train()'s ``optimizer.zero_grad`` (SAM's second
        pass starts from none: the heads' first-pass gradient must not add to it)."""
        for p in self.net.params:
            p.grad = None
        if self.mixtures is not None:
            self.mixtures.zero_grad()
        if self.heads is not None:
            for p in self.heads.params:
                p.grad = None
        if self.partners is not None:
            self.partners.zero_grad()

    @property
    def ascended(self) -> List[torch.Tensor]:
        """What SAM's ascent moves: train()'s optimizer's every group, the trainable weights, then
        the regularizers' groups (multi_task's head, the learned mixture), under one norm ‖g_m‖."""
        extra = [] if self.heads is None else list(self.heads.params)
        extra += [] if self.mixtures is None else list(self.mixtures.params)
        extra += [] if self.partners is None else list(self.partners.params)
        return self.trainable + extra

    def step(self, factor: Factor) -> None:
        """Every optimizer group's update, as train()'s one ``optimizer.step()``."""
        self.opt.step(factor)
        if self.heads is not None:
            self.heads.step(factor)
        if self.mixtures is not None:
            self.mixtures.step(factor)
        if self.partners is not None:
            self.partners.opt.step(factor)

    def extra_groups(self) -> List[Union[StackedHeads, StackedMixtures, StackedPartners]]:
        """The regularizers' own optimizer groups (multi_task's heads, the learned mixtures, joint
        tying's partners), in the order train() appends them after the weights' group: the config's."""
        groups = {"multi_task": self.heads, "soft_weight_sharing": self.mixtures, "parameter_tying": self.partners}
        return [groups[r] for r in self.members[0].cfg.regularizer if groups.get(r) is not None]

    def sync_member(self, k: int) -> None:
        """Member k's stacked state its lone regularizers read (logs, report, checkpoint) into them."""
        if self.mixtures is not None:
            self.mixtures.sync(k)
            self.members[k].model.load_state_dict(self.net.member_state(k))  # its weight histogram
        if self.partners is not None:
            self.partners.sync(k, self.members[k].model, self.net)

    @property
    def trainable(self) -> List[torch.Tensor]:
        """The stacked tensors the optimizer updates: train()'s optimizer gets only the lone
        model's parameters that require a gradient (transfer's freeze turns the others off)."""
        return [p for p in self.net.params if p.requires_grad]

    def attach_probes(self) -> None:
        """The probes of the runs (not the slices: an ensemble's K models are one model to them,
        as the former loop measured its Ensemble module), each with its lone run's probe batch
        and generator (a resumed one where its checkpoint left it)."""
        runs, cfg = self.runs, self.members[0].cfg
        first = torch.tensor([runs.slices(i)[0] for i in range(len(runs.members))])
        x_train, y_train = self.data.split("train", self.member_set.index_select(0, first))
        self.probes = build_probes(cfg.probe, x_train, y_train, [int(m.cfg.seed) for m in runs.members],
                                   int(cfg.trainer.eval_batch_size))
        if self.probes is not None and runs.members[0].resume is not None:  # members resume together
            for i, m in enumerate(runs.members):
                self.probes.load_state_dict(m.resume["probes"], i)

    def probe_inputs(self) -> ProbeInputs:
        """The runs as the probes see them: the stacked forward in a lone run's eval mode (no
        dropout or noise; batch norm on the running statistics, left unchanged), the trainable
        parameters (norm scales and shifts included; a lone run's probes leave out what transfer
        froze), padded units masked out; an ensemble's K slices as one model whose output is its
        prediction ln((1/K) Σₖ softmax(zₖ)) (``Runs.probe_forward``)."""
        net, pr = self.net, self.probes
        trained = [p.requires_grad for p in net.params]
        masks = net.param_masks()
        return ProbeInputs(self.runs.probe_forward(net.eval_forward), [p for p, t in zip(net.params, trained) if t],
                           pr.x, pr.y, pr.x_train, pr.y_train, pr.eval_batch_size, members=len(self.runs.members),
                           batched=True, masks=None if masks is None else [mk for mk, t in zip(masks, trained) if t],
                           is_weight=[is_w for (_, _, is_w), t in zip(net.named_params(), trained) if t],
                           k=self.runs.k)

    def keep(self, idx: List[int]) -> None:
        sel = torch.tensor(idx, dtype=torch.long)
        self.members = [self.members[i] for i in idx]
        self.net.keep(sel)
        freeze_(self.net, self.frozen)
        self.opt.keep(sel)
        self.opt.set_params(self.trainable)
        self.drop.keep(idx)
        self.noise.keep(idx)
        self.transforms.keep(idx)
        if self.pretext is not None:
            self.pretext.keep(idx)
        self.member_set = self.member_set.index_select(0, sel)
        if self.mixtures is not None:
            self.mixtures.keep(idx, self.net)
        if self.partners is not None:
            self.partners.keep(idx)
        self.terms = LossTerms(self.members, self.device, self.net, self._stacked_penalties())
        if self.heads is not None:
            self.heads.keep(sel)
            self.terms.heads = self.heads
        if self.clip is not None:
            self.clip = self.clip.index_select(0, sel.to(self.clip.device))
        if self.decoupled is not None:
            self.decoupled = (self.decoupled[0].index_select(0, sel.to(self.device)), self.decoupled[1])
        if self.rho is not None:
            self.rho = self.rho.index_select(0, sel.to(self.rho.device))
            self.eta = self.eta.index_select(0, sel.to(self.eta.device))
        if self.schedule is not None:
            self.schedule.keep(sel)
        if self.best is not None:
            self.best = [b.index_select(0, sel.to(b.device)) for b in self.best]

    def clip_(self) -> None:
        """Gradient clipping, each member with its own norm, right after every backward pass
        (SAM's second one included), as train() clips."""
        if self.clip is not None:
            clip_grad_norms_(self.trainable, self.clip, self.owner)

    def before_step(self, factor: Factor) -> None:
        """Decoupled weight decay, each member with its own values, where train() applies it:
        after the (clipped) gradient, before the optimizer step."""
        if self.decoupled is not None:
            lam, biases = self.decoupled
            lr = self.opt.hp["lr"]
            lr = (lr.view(-1) if isinstance(lr, torch.Tensor) else lr) * (
                factor.view(-1) if isinstance(factor, torch.Tensor) else factor)
            DecoupledWeightDecay.shrink_([p for _, p, is_w in self.net.named_params()
                                          if (is_w or biases) and p.requires_grad], lr, lam)


def frozen_names(members: List[Member]) -> Set[str]:
    """The parameters the members' lone models do not train (transfer's freeze), the same for all:
    a stacked tensor is updated for every member or for none."""
    per = [{n for n, p in m.model.named_parameters() if not p.requires_grad} for m in members]
    if any(f != per[0] for f in per):
        raise ConfigError("regularizer.transfer: members of one population freeze different parameters "
                          "(a stacked tensor cannot be frozen for some members only); use sweep.engine=serial")
    return per[0]


def freeze_(net: StackedMLP, names: Set[str]) -> None:
    for name, p, _ in net.named_params():
        p.requires_grad_(name not in names)


def _grad_norms(b: Bucket) -> torch.Tensor:
    """(M, weights) norms of each trainable weight's gradient, as layer_grad_norms logs them."""
    return torch.stack([torch.linalg.vector_norm(w.grad, dim=(1, 2)) for w in b.net.weights if w.requires_grad], 1)


@torch.no_grad()
def clip_grad_norms_(params: List[torch.Tensor], max_norm: torch.Tensor,
                     owner: Optional[torch.Tensor] = None) -> None:
    """``nn.utils.clip_grad_norm_`` per member: member m's gradient, all parameters together, is
    scaled by min(1, max_norm[m] / (‖g_m‖ + 1e-6)), its global norm taken as torch takes it
    (each tensor's norm, then the norm of those). Padded units have an exactly zero gradient,
    so the norm is over the member's real units; an infinite max_norm (no clipping) scales by 1.
    ``owner`` (M,): members with one owner (an ensemble's models) share one norm over all of theirs."""
    norms = torch.stack([torch.linalg.vector_norm(p.grad, dim=tuple(range(1, p.dim()))) for p in params], 1)
    total = torch.linalg.vector_norm(norms, dim=1)
    if owner is not None:
        sq = torch.zeros(int(owner.max()) + 1, device=total.device).index_add_(0, owner, total.pow(2))
        total = sq.sqrt().index_select(0, owner)
    coef = (max_norm / (total + 1e-6)).clamp_(max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))


def _heads(members: List[Member], net, cfg, device: torch.device) -> Optional[StackedHeads]:
    """The members' multi_task heads on the features ``net``'s output layer reads, stepped by the
    members' own update rule and values."""
    if "multi_task" not in cfg.regularizer:
        return None
    regs = [next(r for r in m.regs if r.name == "multi_task") for m in members]
    return StackedHeads(regs, net.head_columns(), net.weights[-1].shape[2],
                        lambda ps: StackedOptimizer(_base_name(cfg.optimizer), ps, _member_hypers(members),
                                                    bool(cfg.optimizer.get("nesterov", False)), device,
                                                    bool(cfg.optimizer.get("centered", False)), _amsgrad(cfg)),
                        device)


def _step_noise(members: List[Member], drop: MemberDropout, net, device: torch.device) -> StepNoise:
    """Input and weight noise of the members (σ per member), drawn in a lone run's order on the
    weights a lone model's Linear/Conv transforms reach (``net.perturbed``; default: all), in
    each member's block of them (``net.weight_corners``; default: an MLP's)."""
    layers = len(net.weights)
    body = getattr(net, "perturbed", [True] * (layers - 1))
    regs = members[0].cfg.regularizer  # the regularizer list is shared; only σ may differ
    sigmas = lambda name: [_reg(m, name, "sigma") for m in members] if name in regs else None  # noqa: E731
    head = bool(regs.weight_noise.include_head) if "weight_noise" in regs else False
    connect = [_reg(m, "dropconnect", "p") for m in members] if "dropconnect" in regs else None
    connect_head = bool(regs.dropconnect.include_head) if "dropconnect" in regs else False
    first = [n for n in regs if n in ("dropconnect", "weight_noise")][:1] == ["dropconnect"]  # attach order
    return StepNoise(drop, sigmas("input_noise"), sigmas("weight_noise"), body + [head], device,
                     connect, body + [connect_head], first, getattr(net, "weight_corners", None))


@dataclass
class Loop:
    """What the step loop of a bucket needs besides the bucket: sizes, schedule, precision."""
    bs: int
    steps_per_epoch: int
    total_steps: int
    factor: Schedule  # the members' lr factor at a step
    autocast: object
    grad_norms: bool
    step: int = 0
    manual: bool = False  # StackedMLP.manual_step instead of autograd (see _manual_ok)


def _train_epoch(b: Bucket, loop: Loop, rows: torch.Tensor, stop: StopFlag, start: int = 0,
                 running: Optional[torch.Tensor] = None):
    """One epoch of steps for every member, from step ``start`` (a resumed epoch, whose loss
    sums so far are ``running``); returns (loss/penalty sums (M, 1+R), grad norms, the steps
    of the epoch done: all unless a stop was requested). Nothing here waits for the device."""
    if running is None:
        running = torch.zeros(len(b.members), 1 + len(b.terms.reg_names), device=b.device)
    grad_norms = None
    xs, ys = b.data.batch(rows)  # the epoch's examples in each member's order, gathered at once
    # per epoch, not per step: the step's views, and what it draws (members change only
    # between epochs); on a narrow bucket each such per-step call is a visible share of the step
    xbs, ybs = xs.split(loop.bs, 1), ys.split(loop.bs, 1)
    pretext_first = b.pretext is not None and b.transforms.pretext_first
    transforms, noise, drop = b.transforms.active, b.noise.active, b.drop.active
    reshare = b.shared_input is not None and (transforms or noise)
    total = running[:, 0]
    last = loop.steps_per_epoch - 1
    for i in range(start, loop.steps_per_epoch):
        xb, yb = xbs[i], ybs[i]
        if pretext_first:  # listed first: before every other draw
            xb = b.pretext.draw(xb)
        weights = None
        if transforms:  # augmentation, FGSM, a later pretext: the step's draws in the lone run's order
            xb, masks, weights = b.transforms.draw(xb, yb, b.net.forward, b.net.weights, b.net.layer_widths)
        elif noise:
            xb, masks, weights = b.noise.draw(xb, b.net.weights, b.net.layer_widths)
        else:
            masks = b.drop.masks(xb.shape[1]) if drop else None
        if reshare:
            xb = b.shared_input(xb)
        if loop.manual:
            loss = b.net.manual_step(xb, yb, masks, weights)
            b.clip_()
            factor = loop.factor(loop.step)
            b.before_step(factor)
            if i == last and loop.grad_norms:
                grad_norms = _grad_norms(b)
            if b.sam:  # the same batch's gradient once more, at each member's ascended weights
                _ascend(b, lambda: (b.net.manual_step(xb, yb, *_fresh_draws(b, xb.shape[1], masks, weights)),
                                    b.clip_()))
            b.opt.step(factor)
            loop.step += 1
            total += loss * xb.shape[1]
            if stop.requested:
                return running, grad_norms, i + 1
            continue

        if b.heads is not None:  # each member's batch positions in its own training set
            b.heads.idx = rows[:, i * loop.bs:(i + 1) * loop.bs] - b.member_set.to(rows.device)[:, None] * b.data.n
        if b.partners is not None:  # one partner batch per step (SAM's second pass reuses it)
            b.partners.draw(yb.shape[1])
        if b.bagging is not None:  # the same, for the bootstrap counts of its examples
            b.bagging.idx = rows[:, i * loop.bs:(i + 1) * loop.bs] - b.member_set.to(rows.device)[:, None] * b.data.n

        def backward(xb=xb, yb=yb, masks=masks, weights=weights):
            with loop.autocast:
                logits = b.forward(xb, masks, weights)
            if b.bagging is not None:
                loss = b.bagging.loss(logits, yb)
            else:
                loss = b.terms.loss(logits, yb) if b.pretext is None else b.pretext.loss(logits)
            pens = b.terms.penalties(b.net, loss, _batch(b, xb, yb, loss, masks, weights))
            b.zero_grad()
            # members are independent: the sum's gradient is each member's own gradient
            (loss.sum() + sum(pen.sum() for pen in pens)).backward()
            b.clip_()
            return loss, pens

        loss, pens = backward()
        factor = loop.factor(loop.step)
        b.before_step(factor)
        if i == last and loop.grad_norms:
            grad_norms = _grad_norms(b)
        if b.sam:  # drawn inside the closure: a lone run perturbs the ascended weights
            _ascend(b, lambda: backward(xb, yb, *_fresh_draws(b, xb.shape[1], masks, weights)))
        b.step(factor)
        loop.step += 1
        running += torch.stack([loss] + pens, 1).detach() * xb.shape[1]  # no graph kept across steps
        if stop.requested:
            return running, grad_norms, i + 1
    return running, grad_norms, loop.steps_per_epoch


def _ascend(b: Bucket, closure: Callable[[], object]) -> None:
    """SAM's second pass for every member: ``.grad`` becomes ∇L_m(w_m + ε̂_m), the weights stay w."""
    o = b.members[0].cfg.optimizer
    params, once = b.ascended, None
    if b.mixtures is not None and b.mixtures.first is not None:
        # an ensemble's one mixture: its copies' summed gradient, counted once
        b.mixtures.sum_copies()
        once = [b.mixtures.first if any(p is q for q in b.mixtures.params) else None for p in params]
    ascended_gradient(params, closure, b.rho, bool(o.adaptive), b.eta, len(b.members), b.owner, once)


def _batch(b: Bucket, xb: torch.Tensor, yb: torch.Tensor, loss: torch.Tensor, masks, weights) -> Batch:
    """The step as a batch penalty sees it; each of its extra forward passes draws fresh
    dropout masks, weight noise and DropConnect masks, as a lone run's extra pass does."""
    def extra_pass(x: torch.Tensor) -> torch.Tensor:
        # the step's hidden activations stay what the activity penalties and heads read, as a
        # lone run's tangent_prop restores its sites after its extra pass
        kept, record = b.net.hidden, b.net.record
        b.net.record = False  # nor is the head's recorded input (a CNN's, a Transformer's) replaced
        out = b.forward(x, *_fresh_draws(b, x.shape[1], masks, weights))
        b.net.hidden, b.net.record = kept, record
        return out

    # an ensemble's penalty differentiates each owner's Ensemble output (Owners.joint)
    return Batch(xb, yb, loss, b.runs.joint(extra_pass), b.terms.loss, b.net.params, tuple(b.data.input_shape))


def _fresh_draws(b: Bucket, batch: int, masks, weights):
    """(dropout masks, weights) of another training forward pass of ``batch`` examples (SAM's
    second pass, a batch penalty's extra ones): as a lone run's pass, it draws fresh dropout
    masks and, layer by layer, fresh weight noise and DropConnect masks on the weights as they
    are now (SAM's ascended ones), from each member's generator in the lone order; input
    noise, added to the batch once, stays."""
    if any(b.noise.noised) or any(b.noise.connects):
        return b.noise.forward_draws(batch, b.net.weights, b.net.layer_widths)
    return (b.drop.masks(batch) if b.drop.active else masks), weights


def train_bucket(members: List[Member], width: int, opts: Options, data_cache=None,
                 on_epoch: Optional[Callable[[List[Member]], None]] = None,
                 on_finish: Optional[Callable[[Member, Dict], None]] = None) -> List[Dict]:
    """Train ``members`` (one group, widths <= ``width``) together; return their metrics.

    ``on_epoch(live)`` is called after each epoch with the members that trained it (a sweep's
    progress bar; without it the bucket has its own bar, ``trainer.progress``), and
    ``on_finish(member, metrics)`` once per member when its result is written (diverged ones
    during the loop, the others at its end)."""
    from regexp.train.trainer import resolve_device

    cfg = members[0].cfg
    t = cfg.trainer
    k = components(cfg)  # the stacked slices each member owns: an ensemble's K models, else 1
    device = resolve_device(t.device)
    data = PopulationData([m.cfg for m in members for _ in range(k)],
                          [data_key(m.cfg, m.point) for m in members for _ in range(k)], device, data_cache)
    bs = data.n if t.batch_size == "full" else int(t.batch_size)
    if bs > data.n:
        raise ConfigError(f"trainer.batch_size={bs} is invalid: expected at most {data.n}, the number of "
                          "training examples (or \"full\")")
    _build_models(members, data, device, k)
    runs = Runs(members) if k == 1 else Owners(members, k)
    b = Bucket(runs.slice_members(), width, data, device, opts)
    runs.attach(b)
    steps = math.ceil(data.n / bs)
    b.schedule = Schedule([m.cfg.scheduler for m in b.members], t.epochs * steps, device)
    loop = Loop(bs, steps, t.epochs * steps, b.schedule,
                torch.autocast(device.type, dtype=torch.bfloat16) if opts.bf16 else nullcontext(),
                bool(cfg.logger.grad_norms))
    loop.manual = _manual_ok(b, opts)
    if isinstance(b.net, StackedCNN):
        twice = any(f[0].batch_penalty_of is not None for f in b.terms.forms.values())
        why = ("a penalty's double backward" if twice else "extra.population.compile=true" if opts.compile
               else "extra.population.bf16=true" if opts.bf16 else None)
        tuned = tuning.record(tuning.choose_form(b, bs, why))
    else:
        tuned = tuning.record(tuning.choose_loop(b, opts.loop_width, bs, loop.manual))
    for m in members:
        m.tuning = tuned
    results: Dict[int, Dict] = {}
    ids = {id(m): i for i, m in enumerate(members)}
    epoch, perms, running, in_epoch = _restore(b, loop)  # (0, None, None, 0) for a fresh start
    desc = f"population w<={width} x{len(members)}" + (f" (ensembles of {k})" if k > 1 else "")
    bar = tqdm(total=t.epochs, initial=epoch, desc=desc, leave=False,
               disable=None if t.progress and on_epoch is None else True, dynamic_ncols=True)
    with StopFlag() as stop:
        # a signal during start-up: no step is taken, and no checkpoint written (nothing to go on from)
        started = signals.requested() is None
        while started and epoch < t.epochs and runs.members:
            # orders, loss sums and steps are per slice; what follows the epoch is per run
            if in_epoch == 0:
                rows = data.epoch_index([m.order for m in b.members], b.member_set)
                perms = rows - b.member_set.to(device)[:, None] * data.n
                running = None
            else:  # a resumed epoch: its order was drawn before the interruption
                rows = perms + b.member_set.to(device)[:, None] * data.n
            # the hand-written step builds no graph: one no_grad for the epoch, not one per call
            with torch.no_grad() if loop.manual else nullcontext():
                running, grad_norms, in_epoch = _train_epoch(b, loop, rows, stop, in_epoch, running)
            if in_epoch < loop.steps_per_epoch:
                break
            epoch, in_epoch = epoch + 1, 0
            done = _epoch_end(b, epoch, running / data.n, grad_norms, loop.factor(loop.step), cfg, t)
            bar.update(1)
            if on_epoch is not None:
                on_epoch(list(runs.members))  # the diverged ones trained this epoch too
            for i in done:
                m = runs.members[i]
                results[ids[id(m)]] = finish(m, device, diverged_epoch=epoch)
                if on_finish is not None:
                    on_finish(m, results[ids[id(m)]])
            stopped = [i for i, m in enumerate(runs.members) if m.stopped]
            for i in stopped:  # its final files now, as train() writes them when it stops
                m = runs.members[i]
                m.status = "completed"
                ck = _checkpoint(b, i, loop, perms, running, 0)
                if b.probes is not None:
                    _stopped_probes(b, i, epoch)
                results[ids[id(m)]] = _finish_completed(b, i, ck)
                if on_finish is not None:
                    on_finish(m, results[ids[id(m)]])
            pruned = [i for i, m in enumerate(runs.members) if m.pruned]
            if pruned and stop.requested:  # as train(): the run is recorded as interrupted instead
                pruned = []
            for i in pruned:  # its checkpoint and metrics.json, no final weights or probes
                m = runs.members[i]
                m.status = "pruned"
                results[ids[id(m)]] = finish(m, device, checkpoint=_checkpoint(b, i, loop, perms, running, 0))
                if on_finish is not None:
                    on_finish(m, results[ids[id(m)]])
            done = done + stopped + pruned
            if done:
                kept = [i for i in range(len(runs.members)) if i not in done]
                if not kept:  # every run is written out: nothing left to stack
                    runs.members = []
                    break
                sel = torch.tensor(runs.keep(b, kept), device=perms.device)
                perms, running = perms.index_select(0, sel), running.index_select(0, sel)
            if t.checkpoint_every and epoch % t.checkpoint_every == 0 and epoch < t.epochs:
                for i, m in enumerate(runs.members):  # as train() does: a killed sweep resumes from here
                    save_torch(m.out_dir / "checkpoint.pt", _checkpoint(b, i, loop, perms, running, 0))
            if stop.requested:
                break
    bar.close()
    status = "completed" if epoch >= t.epochs else "interrupted"
    # as train(): the checkpoint first, then the final probes on the weights model.pt holds
    cks = ([_checkpoint(b, i, loop, perms, running, 0) for i in range(len(runs.members))]
           if status == "completed" else [])
    if cks and b.probes is not None:
        _final_probes(b, epoch)
    for i, m in enumerate(runs.members):
        m.status, m.epochs, m.signal = status, epoch, stop.signum
        # An interrupted run leaves train()'s checkpoint of where it stopped (mid-epoch too);
        # re-launching the sweep resumes it from there.
        results[ids[id(m)]] = (_finish_completed(b, i, cks[i]) if status == "completed"
                               else finish(m, device, checkpoint=_checkpoint(b, i, loop, perms, running, in_epoch)
                                           if started else None))
        if on_finish is not None:
            on_finish(m, results[ids[id(m)]])
    return [results[i] for i in range(len(members))]


def _manual_ok(b: Bucket, opts: Options) -> bool:
    """Whether the bucket's step can skip autograd: relu MLPs of one width without norms or skips,
    no penalty term, no label smoothing, pretext or bagging loss, no DropConnect (whose gradient passes
    through its mask), no frozen tensor, plain float32 eager forward (then the gradient is a few
    products written out by hand; a CNN or Transformer has none)."""
    return (b.net.manual_step is not None and not b.net.fancy and b.net.act is torch.relu
            and not b.terms.reg_names and b.terms.eps_common == 0.0 and not b.frozen and b.pretext is None
            and not any(b.noise.connects) and b.bagging is None and not opts.bf16 and not opts.compile)


def _checkpoint(b: Bucket, i: int, loop: Loop, perms: Optional[torch.Tensor], running: Optional[torch.Tensor],
                in_epoch: int) -> Dict:
    """Run i's checkpoint.pt, in train()'s format, after ``loop.step`` steps."""
    m, sl = b.runs.members[i], b.runs.slices(i)
    # a run's slices share its lr, data order, heads and groups (only a run of one slice has heads
    # or groups: nothing of theirs trains beside an ensemble); the probes are the run's
    first = sl[0]
    for s in sl:
        b.sync_member(s)  # its regularizers' state (the mixture) goes into the checkpoint
    best = b.runs.state(b, i, b.best) if b.best is not None else None
    sums = b.runs.per_run(running)[i].cpu() if running is not None else torch.zeros(1 + len(b.terms.reg_names))
    opt_state = [st for s in sl for st in _member_opt_state(b, s)]  # the lone model's parameters, in order
    if b.heads is not None:  # the head's weights are the regularizer's (its state_dict)
        b.heads.sync(first)
    for g in b.extra_groups():  # each a further group of the lone optimizer, in its order
        opt_state += g.member_opt_state(first)
    with b.runs.checkpointing(b, i, running):
        return checkpoint_dict(m, b.runs.state(b, i), opt_state, loop.total_steps,
                               b.opt.lr_of(first, loop.factor(loop.step)),
                               perms[first].cpu() if perms is not None else None, sums, best, steps_done=loop.step,
                               step_in_epoch=in_epoch,
                               probe_state=b.probes.state_dict(i) if b.probes is not None else None,
                               factor=loop.factor.member(first, loop.step))


def _final_probes(b: Bucket, epoch: int) -> None:
    """Every member's end-of-run measurement, batched: its history row, scalars and figures; on
    the weights model.pt holds (early stopping's best epoch, as train() loads them back first)."""
    with _best_weights(b):
        measured = b.probes.measure_members(b.probe_inputs())
    for i, (m, values) in enumerate(zip(b.runs.members, measured)):
        _record_final(b.probes, m, i, epoch, values)


def _record_final(probes, m: Member, k: int, epoch: int, values: Dict[str, float]) -> None:
    logs: Dict[str, float] = {}
    probe_record(m.probe_history, epoch, values, logs)
    m.final_probes = values
    write_scalars(m.tb, logs, epoch)
    probes.save_figures(m.out_dir, m.tb, epoch, k)


def _restores_best(b: Bucket) -> bool:
    """Whether the members end on their best epoch's weights (the regularizer list is shared)."""
    return b.best is not None and any(r.restores_best for r in b.members[0].regs)


@contextmanager
def _best_weights(b: Bucket):
    """The stacked state holds every member's final weights (its best epoch's, when restored) inside."""
    if not _restores_best(b):
        yield
        return
    with torch.no_grad():
        kept = [t.detach().clone() for t in b.net.state_tensors]
        for t, best in zip(b.net.state_tensors, b.best):
            t.copy_(best)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, k in zip(b.net.state_tensors, kept):
                t.copy_(k)


def _stopped_probes(b: Bucket, i: int, epoch: int) -> None:
    """A run early stopping ended: its final probes as its lone run measures them, on its lone
    model (an ensemble's Ensemble module) holding the weights model.pt will (the best epoch's), with
    its probe batch and generator (the other runs go on, so the batched probes, which draw for all,
    do not measure it)."""
    m = b.runs.members[i]
    m.model.load_state_dict(b.runs.state(b, i, b.best) if _restores_best(b) else b.runs.state(b, i))
    lone = b.probes.member(i)
    _record_final(lone, m, 0, epoch, lone.measure(m.model))


def _finish_completed(b: Bucket, i: int, ck: Dict) -> Dict:
    """Run i's final weights, best weights, checkpoint and reports, as train() leaves them."""
    m, first = b.runs.members[i], b.runs.slices(i)[0]
    state = b.runs.state(b, i)
    best = b.runs.state(b, i, b.best) if b.best is not None else None
    if b.heads is not None:
        b.heads.sync(first)
    ds = b.data.sets[int(b.member_set[first])]  # the lone run's tensors, for report()
    tensors = {s: tuple(v.to(b.device) for v in ds.split(s)) for s in SPLITS}
    return finish(m, b.device, state, best, ck, tensors=tensors, eval_batch=m.cfg.trainer.eval_batch_size)


def _restore(b: Bucket, loop: Loop) -> Tuple[int, Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """Where resumed members stopped: (epoch, this epoch's orders (M, n), loss sums so far,
    steps into the epoch); the optimizer state, schedule position and best weights come back
    into the stacked tensors. Members of a bucket stopped at the same step (see run.py)."""
    cks = [m.resume for m in b.members]
    if cks[0] is None:
        return 0, None, None, 0
    epoch, in_epoch, loop.step = b.members[0].position
    b.opt.steps = loop.step
    states = [ck["optimizer"]["state"] for ck in cks]
    for key in states[0].get(0, {}):
        per_param = [[st[j][key] for st in states] for j in range(len(b.trainable))]
        b.opt.state[key] = ([ts[0].to(b.device) for ts in per_param] if key == "step"  # shared count
                            else [b.net.stack(ts, p) for ts, p in zip(per_param, b.trainable)])
    first = len(b.trainable)  # the regularizers' groups follow the weights' in torch.optim's state
    for g in b.extra_groups():
        g.restore(states, first, loop.step)
        first += len(g.params)
    if all(ck["best_state"] is not None for ck in cks):
        b.best = b.net.stack_states([ck["best_state"] for ck in cks])
    if in_epoch == 0:
        return epoch, None, None, 0
    perms = torch.stack([ck["perm"] for ck in cks]).to(b.device)
    running = torch.stack([ck["running"] for ck in cks]).to(b.device)
    return epoch, perms, running, in_epoch


def _build_models(members: List[Member], data: PopulationData, device: torch.device, k: int = 1) -> None:
    """Each member's lone model, built exactly as train() builds it (and brought to its
    checkpoint when it resumes), and its open log (``k``: the slices each owns; member i's data
    are its first slice's)."""
    from regexp.models import build_model
    from regexp.models.summary import model_summary
    from regexp.regularizers import build_regularizers
    from regexp.regularizers.base import Context
    from regexp.train.io import save_torch, write_json
    from regexp.train.trainer import INIT_MODEL, seed_everything

    for i, m in enumerate(members):
        m.out_dir.mkdir(parents=True, exist_ok=True)
        ds = data.dataset(i * k)
        if len(ds.noisy_indices):
            write_json(m.out_dir / "label_noise.json", {"indices": ds.noisy_indices.tolist(),
                                                        "original_labels": ds.clean_labels.tolist()})
        seed_everything(int(m.cfg.seed))
        m.model = build_model(m.cfg.model, data.input_shape, data.num_classes).to(device)
        m.t0 = time.time()  # a member's wall_s is its bucket's: they train together
        ctx = Context(data.num_classes, data.n, device, data.input_shape, int(m.cfg.seed), m.out_dir,
                      model_cfg=m.cfg.model, data=ds, data_cfg=m.cfg.data)
        # A member has no torch optimizer; what regularizers read of one (the current lr, for
        # decoupled decay's log) is a stand-in whose lr each epoch's end sets.
        ctx.optimizer = SimpleNamespace(param_groups=[{"lr": float(m.cfg.optimizer.lr)}])
        m.regs = build_regularizers(m.cfg.regularizer, ctx)
        for r in m.regs:  # as build_initial_model (masked_reconstruction's head draws its init)
            m.model = r.wrap_model(m.model)
        m.dropout_gen.set_state(torch.get_rng_state())
        for r in m.regs:
            r.attach(m.model)
        m.dropout_gen.set_state(torch.get_rng_state())  # as train() leaves it: after attach (multi_task's head)
        if m.resume is None or not (m.out_dir / INIT_MODEL).exists():  # as train() writes it
            save_torch(m.out_dir / INIT_MODEL, m.model.state_dict())
        if m.resume is not None:
            m.restore()
        m.open_log()
    # as train() logs it (once per bucket, not per member: the members share the layout)
    logging.getLogger("regexp").info(model_summary(members[0].model, data.input_shape, members[0].cfg.model.name))


def _member_opt_state(b: Bucket, k: int) -> List[Dict[str, torch.Tensor]]:
    """Member k's optimizer state per trainable parameter, unpadded, under torch.optim's names."""
    out: List[Dict[str, torch.Tensor]] = [dict() for _ in b.trainable]
    for key, ts in b.opt.state.items():
        if key == "step":
            for d, s in zip(out, ts):
                d[key] = s.detach().cpu().clone()
            continue
        # a frozen tensor has no state: its own values stand in for the slot member_state reads
        it = iter(ts)
        state = b.net.member_state(k, [next(it) if p.requires_grad else p for p in b.net.params])
        # by position: a member's own names may differ from the stack's (a skip on its first layer)
        for d, t in zip(out, [t for t, p in zip(state.values(), b.net.params) if p.requires_grad]):
            d[key] = t
    return out


def _eval_chunk(b: Bucket, budget: int, limit: int) -> int:
    """Rows per evaluation chunk whose hidden activations (every member's, or one member's in
    the member-by-member form) fit in ``budget`` bytes."""
    per_row = b.net.width if b.net.loop else len(b.members) * b.net.width
    return max(1, min(limit, budget // (4 * per_row)))


def _eval_budget(b: Bucket, limit: int) -> int:
    """The bucket's evaluation chunk budget, timed on its largest split (population/tuning.py)."""
    base = getattr(b.net, "eval_bytes", EVAL_LOOP_BYTES if b.net.loop else EVAL_BYTES)
    x, y = max((b.data.split(s, b.member_set) for s in SPLITS), key=lambda xy: xy[1].shape[1])
    if not y.shape[1]:
        return base
    return tuning.choose_eval_budget(
        b, base, y.shape[1], lambda budget: evaluate_members(b.net, b.runs, x, y, _eval_chunk(b, budget, limit)),
        lambda budget: min(_eval_chunk(b, budget, limit), y.shape[1]))


def _epoch_end(b: Bucket, epoch: int, mean_terms: torch.Tensor, grad_norms: Optional[torch.Tensor],
               lr_factor_now: Factor, cfg, t) -> List[int]:
    """Logs, evaluation, best-state tracking and the divergence check, per run; return the
    diverged runs (``mean_terms`` and ``grad_norms`` are per slice)."""
    runs = b.runs
    sums = runs.per_run(mean_terms).tolist()  # the one host read of the epoch's training losses
    with torch.no_grad():
        sq = sum(p.pow(2).sum(dim=tuple(range(1, p.dim()))) for p in b.net.params)
        l2 = torch.sqrt(runs.per_run(sq)).tolist()
    gn = grad_norms.tolist() if grad_norms is not None else None
    evaluated = epoch % t.eval_every == 0 or epoch == t.epochs
    evals, sparsity = {}, None
    if evaluated:
        if b.eval_bytes is None:
            b.eval_bytes = _eval_budget(b, t.eval_batch_size)
        for s in SPLITS:
            x, y = b.data.split(s, b.member_set)
            if y.shape[1]:
                chunk = _eval_chunk(b, b.eval_bytes, t.eval_batch_size)
                hidden = len(b.net.weights) - 1
                counts = torch.zeros(len(b.members), 2, dtype=torch.long, device=x.device) \
                    if s == "test" and hidden else None  # hidden units off, as a lone run counts them
                l, a = evaluate_members(b.net, runs, x, y, chunk, counts)
                evals[s] = (l.tolist(), a.tolist())
                if counts is not None:
                    units = torch.tensor([b.net.hidden_units(k) * y.shape[1] for k in range(len(b.members))],
                                         device=x.device)
                    sparsity = (runs.per_run(counts.double()) / runs.per_run(units)[:, None]).tolist()
    # periodic probes of every member at once; the last epoch's is the end-of-run measurement
    probed = drawn = None
    if b.probes is not None and b.probes.due(epoch) and epoch < t.epochs:
        drawn = [g.get_state() for g in b.probes.generators]  # a run stopping now never drew these
        probed = b.probes.measure_members(b.probe_inputs())
    diverged, improved = [], []
    hist_every = cfg.logger.histogram_every
    for i, m in enumerate(runs.members):
        sl = runs.slices(i)
        lr = b.opt.lr_of(sl[0], lr_factor_now)  # a run's slices share its lr
        if not finite(sums[i]):
            m.status, m.epochs = "diverged", epoch
            write_scalars(m.tb, {"diverged": 1.0, "loss/train_running": sums[i][0]}, epoch)
            diverged.append(i)
            continue
        logs = {"loss/train_running": sums[i][0], "lr": lr}
        logs.update({f"penalty/{r}": v for r, v in zip(b.terms.reg_names, sums[i][1:])})
        logs["weights/l2_norm"] = l2[i]
        if gn is not None:
            for j, si in enumerate(sl):
                # each slice's own names (a skip on its first layer renames that layer)
                weight_names = [own for (_, p, is_w), own in zip(b.net.named_params(), b.net.member_names[si])
                                if is_w and p.requires_grad]
                logs.update({f"grad_norm/{runs.prefix(j)}{name}": v for name, v in zip(weight_names, gn[si])})
        if evaluated:
            row = {"epoch": epoch}
            for s, (ls, acc) in evals.items():
                row[f"{s}_loss"], row[f"{s}_acc"] = ls[i], acc[i]
                logs[f"loss/{s}"], logs[f"acc/{s}"] = ls[i], acc[i]
                if s == "test" and sparsity is not None:
                    for key, v in zip(SPARSITY_KEYS, sparsity[i]):
                        row[f"test_{key}"] = logs[f"sparsity/test_{key}"] = v
            if not math.isfinite(row["train_loss"]):
                m.status, m.epochs = "diverged", epoch
                write_scalars(m.tb, {"diverged": 1.0}, epoch)
                diverged.append(i)
                continue
            m.history.append(row)
            if m.improves(row):
                m.best = dict(row)
                improved.append(i)
            # early stopping: every regularizer sees the row, as in train(); the member is
            # written out by train_bucket (its hook reads the row, not the model's weights)
            m.stopped = any([r.epoch_end(m.model, row) for r in m.regs])
            # then the pruner, whose stop train() records instead of early stopping's
            m.pruned = m.on_row is not None and bool(m.on_row(dict(row)))
            m.stopped = m.stopped and not m.pruned
        m.epochs = epoch
        # train() skips the periodic probe of its last epoch (the probes are per run)
        if probed is not None and not (m.stopped or m.pruned):
            probe_record(m.probe_history, epoch, probed[i], logs)
        elif probed is not None:  # so its final measurement draws where its lone run's does
            b.probes.generators[i].set_state(drawn[i])
        write_scalars(m.tb, logs, epoch)
        for si in sl:
            b.sync_member(si)
        for r in m.regs:
            r.ctx.optimizer.param_groups[0]["lr"] = lr  # the stand-in's lr (_build_models)
            r.log(m.tb, epoch)
        if hist_every and epoch % hist_every == 0:
            write_histograms(m.tb, runs.state(b, i, b.net.params), epoch)  # as tb.histograms: parameters
    if improved:
        _update_best(b, [si for i in improved for si in runs.slices(i)])
    return diverged


@torch.no_grad()
def _update_best(b: Bucket, improved: List[int]) -> None:
    """Copy the improved members' current state (weights, norm statistics) into the stacked best
    state (on the device)."""
    mask = torch.zeros(len(b.members), dtype=torch.bool)
    mask[improved] = True
    mask = mask.to(b.device)
    if b.best is None:
        b.best = [p.detach().clone() for p in b.net.state_tensors]
        return
    for best, p in zip(b.best, b.net.state_tensors):
        sel = mask.view(-1, *([1] * (p.dim() - 1)))
        best.copy_(torch.where(sel, p.detach(), best))
