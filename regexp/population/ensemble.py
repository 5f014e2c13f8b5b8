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
object: at each site the member's slices draw from it one after another; not the trainer
loop's order), so a member trains as its population of one does. Gradient clipping and SAM's
ascent take one norm over all of an owner's slices (``Bucket.owner``).

What is per run is per owner: the training losses summed over its slices, the evaluation on
the ensemble's prediction ln((1/K) Σₖ softmax(zₖ)) (loss, accuracy, best epoch, early
stopping), the logs, ``model.pt`` / ``checkpoint.pt`` under the Ensemble's own names
(``members.k.*``), and the report, which the lone Ensemble module computes on those weights.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from regexp.errors import ConfigError
from regexp.population import engine as E
from regexp.population.compat import incompatibility
from regexp.population.data import SPLITS, PopulationData, data_key
from regexp.population.member import Member, checkpoint_dict, finish, finite, write_histograms, write_scalars
from regexp.train.io import save_torch
from regexp.train.sparsity import KEYS as SPARSITY_KEYS


class Bagging:
    """Each slice's per-example losses weighted by its owner's bootstrap counts, as the lone
    regularizer's data_loss: mean over the batch of counts[k, idx]·CE (label smoothing per slice)."""

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


class Owners:
    """Which member owns which slices: member m's are ``m·K .. m·K + K − 1``."""

    def __init__(self, members: List[Member], k: int):
        self.members, self.k = members, k

    def slices(self, m: int) -> List[int]:
        return list(range(m * self.k, (m + 1) * self.k))

    def index(self, device: torch.device) -> torch.Tensor:
        return torch.arange(len(self.members) * self.k, device=device) // self.k

    def per_owner(self, t: torch.Tensor) -> torch.Tensor:
        """(S, ...) → (M, ...): summed over each owner's slices."""
        return t.view(len(self.members), self.k, *t.shape[1:]).sum(1)

    def share(self, x: torch.Tensor) -> torch.Tensor:
        """(S, ...) → (S, ...): every slice gets its owner's first slice's rows (the one noisy or
        augmented batch a lone Ensemble's K models all read; the other slices' draws are dropped)."""
        m, k = len(self.members), self.k
        return x.view(m, k, *x.shape[1:])[:, :1].expand(m, k, *x.shape[1:]).reshape(x.shape)

    def state(self, b: E.Bucket, m: int, tensors=None) -> Dict[str, torch.Tensor]:
        """Member m's slices as the Ensemble's state_dict (``members.k.*``)."""
        return {f"members.{k}.{n}": t for k, s in enumerate(self.slices(m))
                for n, t in b.net.member_state(s, tensors).items()}


def _slice_members(owners: List[Member], k: int) -> List[Member]:
    """The Bucket's members: each owner's K models, sharing its config, dropout generator and
    regularizers; each slice its own copy of the owner's data order (they draw the same orders)."""
    out = []
    for m in owners:
        for j, model in enumerate(m.model.members):
            order = torch.Generator()
            order.set_state(m.order.get_state())
            s = Member(m.point, m.cfg, m.out_dir, m.overrides, model=model, dropout_gen=m.dropout_gen,
                       order=order, regs=m.regs, plain=m.plain, resume=_slice_resume(m, j, k, model))
            out.append(s)
    return out


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
    else:  # a trainer's checkpoint: its one sum goes to the first slice (the owner sums them)
        running = ck["running"] if j == 0 else torch.zeros_like(ck["running"])
    return {"epoch": ck["epoch"], "step_in_epoch": ck["step_in_epoch"], "scheduler": ck["scheduler"],
            "optimizer": {"state": {i: state[j * n + i] for i in range(n) if j * n + i in state}},
            "best_state": None if best is None else {key[len(prefix):]: v for key, v in best.items()
                                                     if key.startswith(prefix)},
            "perm": ck["perm"], "running": running}


def _reg(m: Member):
    return next(r for r in m.regs if r.name == "ensemble")


def _hook(b: E.Bucket, own: Owners) -> None:
    """The bucket's per-owner parts: the clipping groups and bagging's weights."""
    b.owner = own.index(b.device)
    if any(r in own.members[0].cfg.regularizer for r in ("input_noise", "augmentation")):
        b.shared_input = own.share
    regs = [_reg(m) for m in own.members]
    if regs[0].counts is not None:
        counts = torch.cat([r.counts for r in regs]).to(b.device)
        eps = torch.tensor([E._reg(m, "label_smoothing", "eps") for m in b.members], device=b.device).view(-1, 1)
        b.bagging = Bagging(counts, eps)


@torch.no_grad()
def evaluate_owners(b: E.Bucket, own: Owners, x: torch.Tensor, y: torch.Tensor, batch: int,
                    counts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy of every owner's ensemble prediction, as (M,) tensors
    (x, y: the slices' (S, N, D) inputs and (S, N) labels; ``counts``: per slice). Any stacked
    model's class-major logits; their log-softmax is reduced over each owner's K slices."""
    m, k, n = len(own.members), own.k, y.shape[1]
    loss = torch.zeros(m, device=x.device)
    correct = torch.zeros(m, device=x.device)
    ys = y[::k]
    for j in range(0, n, batch):
        z = b.net.eval_logits(x[:, j:j + batch], batch, counts).float()  # (S, C, rows)
        lp = F.log_softmax(z, 1).view(m, k, *z.shape[1:])
        ens = torch.logsumexp(lp, 1) - math.log(k)  # (M, C, rows): ln of the mean probability
        yb = ys[:, j:j + batch]
        loss -= F.log_softmax(ens, 1).gather(1, yb.unsqueeze(1)).sum((1, 2))  # as F.cross_entropy of it
        correct += E.hits(ens, yb).sum(1)
    return loss / max(n, 1), correct / max(n, 1)


def _epoch_end(b: E.Bucket, own: Owners, epoch: int, mean_terms: torch.Tensor, grad_norms, lr_factor_now: float,
               cfg, t) -> List[int]:
    """engine._epoch_end per owner; returns the diverged owners."""
    sums = own.per_owner(mean_terms).tolist()
    with torch.no_grad():
        sq = sum(p.pow(2).sum(dim=tuple(range(1, p.dim()))) for p in b.net.params)
        l2 = torch.sqrt(own.per_owner(sq)).tolist()
    gn = grad_norms.tolist() if grad_norms is not None else None
    evaluated = epoch % t.eval_every == 0 or epoch == t.epochs
    evals, sparsity = {}, None
    if evaluated:
        for s in SPLITS:
            x, y = b.data.split(s, b.member_set)
            if y.shape[1]:
                per_chunk = b.net.width if b.net.loop else len(b.members) * b.net.width
                budget = getattr(b.net, "eval_bytes", E.EVAL_LOOP_BYTES if b.net.loop else E.EVAL_BYTES)
                chunk = max(1, min(t.eval_batch_size, budget // (4 * per_chunk)))
                counts = torch.zeros(len(b.members), 2, dtype=torch.long, device=x.device) \
                    if s == "test" and len(b.net.weights) > 1 else None
                l, a = evaluate_owners(b, own, x, y, chunk, counts)
                evals[s] = (l.tolist(), a.tolist())
                if counts is not None:
                    units = torch.tensor([b.net.hidden_units(i) * y.shape[1] for i in range(len(b.members))],
                                         device=x.device)
                    sparsity = (own.per_owner(counts.double()) / own.per_owner(units.double())[:, None]).tolist()
    diverged, improved = [], []
    for i, m in enumerate(own.members):
        first = own.slices(i)[0]
        lr = b.opt.lr_of(first, lr_factor_now)
        if not finite(sums[i]):
            m.status, m.epochs = "diverged", epoch
            write_scalars(m.tb, {"diverged": 1.0, "loss/train_running": sums[i][0]}, epoch)
            diverged.append(i)
            continue
        logs = {"loss/train_running": sums[i][0], "lr": lr}
        logs.update({f"penalty/{r}": v for r, v in zip(b.terms.reg_names, sums[i][1:])})
        logs["weights/l2_norm"] = l2[i]
        if gn is not None:
            for k, s in enumerate(own.slices(i)):
                names = [n for (_, p, is_w), n in zip(b.net.named_params(), b.net.member_names[s])
                         if is_w and p.requires_grad]
                logs.update({f"grad_norm/members.{k}.{n}": v for n, v in zip(names, gn[s])})
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
            m.stopped = any([r.epoch_end(m.model, row) for r in m.regs])
            m.pruned = m.on_row is not None and bool(m.on_row(dict(row)))
            m.stopped = m.stopped and not m.pruned
        m.epochs = epoch
        write_scalars(m.tb, logs, epoch)
        for r in m.regs:
            r.ctx.optimizer.param_groups[0]["lr"] = lr
            r.log(m.tb, epoch)
        if cfg.logger.histogram_every and epoch % cfg.logger.histogram_every == 0:
            write_histograms(m.tb, own.state(b, i, b.net.params), epoch)
    if improved:
        E._update_best(b, [s for i in improved for s in own.slices(i)])
    return diverged


def _checkpoint(b: E.Bucket, own: Owners, i: int, loop: E.Loop, perms, running, in_epoch: int) -> Dict:
    """Owner i's checkpoint.pt, in train()'s format for its Ensemble (the slices' loss sums in
    the regularizer's state, so a resumed epoch sums as the uninterrupted one)."""
    m, sl = own.members[i], own.slices(i)
    m.order.set_state(b.members[sl[0]].order.get_state())  # the slices drew the orders, alike
    best = own.state(b, i, b.best) if b.best is not None else None
    if running is not None:
        sums = own.per_owner(running)[i].cpu()
        _reg(m).running = running[sl[0]:sl[-1] + 1].cpu()
    else:
        sums = torch.zeros(1 + len(b.terms.reg_names))
        _reg(m).running = None
    opt_state = [st for s in sl for st in E._member_opt_state(b, s)]
    ck = checkpoint_dict(m, own.state(b, i), opt_state, loop.total_steps, b.opt.lr_of(sl[0], loop.factor(loop.step)),
                         perms[sl[0]].cpu() if perms is not None else None, sums, best, steps_done=loop.step,
                         step_in_epoch=in_epoch, factor=loop.factor(loop.step))
    _reg(m).running = None
    return ck


def _finish_completed(b: E.Bucket, own: Owners, i: int, ck: Dict) -> Dict:
    m = own.members[i]
    best = own.state(b, i, b.best) if b.best is not None else None
    ds = b.data.sets[int(b.member_set[own.slices(i)[0]])]
    tensors = {s: tuple(v.to(b.device) for v in ds.split(s)) for s in SPLITS}
    return finish(m, b.device, own.state(b, i), best, ck, tensors=tensors, eval_batch=m.cfg.trainer.eval_batch_size)


def _keep(b: E.Bucket, own: Owners, kept: List[int]) -> List[int]:
    """Keep the owners ``kept``; return their slices."""
    sl = [s for i in kept for s in own.slices(i)]
    b.keep(sl)
    own.members = [own.members[i] for i in kept]
    b.owner = own.index(b.device)
    if b.bagging is not None:
        b.bagging.keep(torch.tensor(sl, device=b.device))
    return sl


def train_ensembles(members: List[Member], width, opts: E.Options, data_cache=None,
                    on_epoch: Optional[Callable[[List[Member]], None]] = None,
                    on_finish: Optional[Callable[[Member, Dict], None]] = None) -> List[Dict]:
    """engine.train_bucket for members whose regularizers include ``ensemble``."""
    from regexp.population import tuning
    from regexp.train.trainer import resolve_device

    cfg = members[0].cfg
    t = cfg.trainer
    why = incompatibility(cfg)  # a sweep's population reaches here only through its own check
    if why is not None:
        raise ConfigError(f"the population cannot train this ensemble: {why}")
    k = int(cfg.regularizer.ensemble.components)
    device = resolve_device(t.device)
    keys = [data_key(m.cfg, m.point) for m in members for _ in range(k)]
    data = PopulationData([m.cfg for m in members for _ in range(k)], keys, device, data_cache)
    bs = data.n if t.batch_size == "full" else int(t.batch_size)
    if bs > data.n:
        raise ConfigError(f"trainer.batch_size={bs} is invalid: expected at most {data.n}, the number of "
                          "training examples (or \"full\")")
    # the owners' lone Ensembles, built (and resumed) as train() builds them
    E._build_models(members, SimpleNamespace(dataset=lambda i: data.dataset(i * k), n=data.n,
                                             num_classes=data.num_classes, input_shape=data.input_shape), device)
    own = Owners(list(members), k)
    b = E.Bucket(_slice_members(members, k), width, data, device, opts)
    _hook(b, own)
    steps = math.ceil(data.n / bs)
    loop = E.Loop(bs, steps, t.epochs * steps, E._factor_table(cfg.scheduler, t.epochs * steps),
                  torch.autocast(device.type, dtype=torch.bfloat16) if opts.bf16 else E.nullcontext(),
                  bool(cfg.logger.grad_norms))
    loop.manual = E._manual_ok(b, opts) and b.bagging is None  # the hand-written step has no weights
    tuned = tuning.record(tuning.choose_loop(b, opts.loop_width, bs, loop.manual))
    for m in members:
        m.tuning = tuned
    results: Dict[int, Dict] = {}
    ids = {id(m): i for i, m in enumerate(members)}
    epoch, perms, running, in_epoch = E._restore(b, loop)
    bar = tqdm(total=t.epochs, initial=epoch, desc=f"population w<={width} x{len(members)} (ensembles of {k})",
               leave=False, disable=None if t.progress and on_epoch is None else True, dynamic_ncols=True)
    with E.StopFlag() as stop:  # the engine's (a test stops it where it likes)
        while epoch < t.epochs and own.members:
            if in_epoch == 0:
                rows = data.epoch_index([m.order for m in b.members], b.member_set)
                perms = rows - b.member_set.to(device)[:, None] * data.n
                running = None
            else:
                rows = perms + b.member_set.to(device)[:, None] * data.n
            running, grad_norms, in_epoch = E._train_epoch(b, loop, rows, stop, in_epoch, running)
            if in_epoch < loop.steps_per_epoch:
                break
            epoch, in_epoch = epoch + 1, 0
            done = _epoch_end(b, own, epoch, running / data.n, grad_norms, loop.factor(loop.step), cfg, t)
            bar.update(1)
            if on_epoch is not None:
                on_epoch(list(own.members))
            for i in done:
                m = own.members[i]
                results[ids[id(m)]] = finish(m, device, diverged_epoch=epoch)
                if on_finish is not None:
                    on_finish(m, results[ids[id(m)]])
            stopped = [i for i, m in enumerate(own.members) if m.stopped]
            for i in stopped:
                m = own.members[i]
                m.status = "completed"
                results[ids[id(m)]] = _finish_completed(b, own, i, _checkpoint(b, own, i, loop, perms, running, 0))
                if on_finish is not None:
                    on_finish(m, results[ids[id(m)]])
            pruned = [] if stop.requested else [i for i, m in enumerate(own.members) if m.pruned]
            for i in pruned:
                m = own.members[i]
                m.status = "pruned"
                results[ids[id(m)]] = finish(m, device, checkpoint=_checkpoint(b, own, i, loop, perms, running, 0))
                if on_finish is not None:
                    on_finish(m, results[ids[id(m)]])
            done = done + stopped + pruned
            if done:
                kept = [i for i in range(len(own.members)) if i not in done]
                if not kept:
                    own.members = []
                    break
                sel = torch.tensor(_keep(b, own, kept), device=perms.device)
                perms, running = perms.index_select(0, sel), running.index_select(0, sel)
            if t.checkpoint_every and epoch % t.checkpoint_every == 0 and epoch < t.epochs:
                for i, m in enumerate(own.members):
                    save_torch(m.out_dir / "checkpoint.pt", _checkpoint(b, own, i, loop, perms, running, 0))
            if stop.requested:
                break
    bar.close()
    status = "completed" if epoch >= t.epochs else "interrupted"
    for i, m in enumerate(own.members):
        m.status, m.epochs, m.signal = status, epoch, stop.signum
        if status == "completed":
            results[ids[id(m)]] = _finish_completed(b, own, i, _checkpoint(b, own, i, loop, perms, running, 0))
        else:
            results[ids[id(m)]] = finish(m, device, checkpoint=_checkpoint(b, own, i, loop, perms, running, in_epoch))
        if on_finish is not None:
            on_finish(m, results[ids[id(m)]])
    return [results[i] for i in range(len(members))]
