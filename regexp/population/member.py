"""One member of a population: its run's config, folder, logs, and the files it leaves.

Whatever a member writes is what ``train()`` would write for the same config alone:
``metrics.json`` with the same keys (and ``population_tuning``: how its bucket was computed),
a TensorBoard run with the same tags (and HParams entry), ``model.pt`` / ``best_model.pt`` as
state dicts of the lone model, and a ``checkpoint.pt`` in ``train()``'s format (optimizer and
schedule state included).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from regexp.optim import build_optimizer, build_scheduler
from regexp.population.compat import Width, hidden_widths, member_width
from regexp.probes.runner import active, checkpoint_fields, metrics_fields
from regexp.train.io import save_torch, write_json
from regexp.train.records import best_score, improves, run_metrics
from regexp.train.tblog import TBLogger
from regexp.train.trainer import _hparams, rng_state


@dataclass
class Member:
    point: Dict[str, Any]
    cfg: DictConfig
    out_dir: Path
    overrides: List[str]
    # The lone model as train() builds it for this seed (initial weights, names, checkpoints),
    # and the global generator's state right after, from which train() would draw dropout masks.
    model: Optional[nn.Module] = None
    dropout_gen: torch.Generator = field(default_factory=torch.Generator)
    order: Optional[torch.Generator] = None  # data order, seeded as train() seeds it
    regs: List[Any] = field(default_factory=list)  # its regularizer objects: log() and report()
    t0: float = field(default_factory=time.time)
    tb: Optional[TBLogger] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    best: Optional[Dict[str, float]] = None
    status: str = "running"
    stopped: bool = False  # early stopping ended its training (it completed, before the last epoch)
    # a search's pruner (train()'s on_epoch): sees each evaluated row; True stops the member there
    on_row: Optional[Callable[[Dict[str, float]], bool]] = None
    pruned: bool = False  # on_row stopped it (status pruned, checkpointed, as train() leaves it)
    epochs: int = 0
    signal: Optional[int] = None
    resume: Optional[Dict[str, Any]] = None  # the checkpoint.pt of an interrupted run, to go on from
    threads_reason: str = ""  # how trainer.threads was chosen for its population
    tuning: Dict[str, Any] = field(default_factory=dict)  # its bucket's form and why (population/tuning.py)
    probe_history: List[Dict[str, float]] = field(default_factory=list)  # as train()'s, one row per measurement
    final_probes: Dict[str, float] = field(default_factory=dict)  # the final weights' values (completed only)
    record: Dict[str, Any] = field(default_factory=dict)  # more metrics.json keys (a lone run's engine)
    # the resolved config as plain containers, made once: metrics.json, the checkpoint and the
    # HParams entry all read it (resolving a whole config costs milliseconds, per member)
    plain: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.plain is None:
            self.plain = OmegaConf.to_container(self.cfg, resolve=True)
        if self.order is None:
            self.order = torch.Generator().manual_seed(int(self.cfg.seed))

    @property
    def position(self) -> tuple:
        """(epochs done, steps into the next epoch, optimizer steps done): where training starts.
        Members of one population start together."""
        ck = self.resume
        return (0, 0, 0) if ck is None else (ck["epoch"], ck["step_in_epoch"], ck["scheduler"]["last_epoch"])

    def restore(self) -> None:
        """Load the checkpoint into the lone model, regularizers, generators and records, as
        train() does when it resumes."""
        ck = self.resume
        self.model.load_state_dict(ck["model"])
        for r, st in zip(self.regs, ck["regularizers"]):
            r.load_state_dict(st)
        self.dropout_gen.set_state(ck["rng"]["torch"])
        self.order.set_state(ck["order"])
        self.history, self.best, self.epochs = list(ck["history"]), ck["best"], ck["epoch"]
        self.probe_history = list(ck["probe_history"])

    @functools.cached_property
    def width(self) -> Width:
        """What the population pads: an MLP's widest hidden layer, a CNN's channels per stage."""
        return member_width(self.cfg.model)

    @functools.cached_property
    def widths(self) -> List[int]:
        """The hidden widths, input to output (a CNN's channels per stage)."""
        return hidden_widths(self.cfg.model)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def open_log(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.resume is not None:  # as train() resumes: drop events after the checkpoint's epoch
            self.tb = TBLogger(self.out_dir, self.cfg.logger.tensorboard, purge_step=self.resume["epoch"] + 1)
            return
        self.tb = TBLogger(self.out_dir, self.cfg.logger.tensorboard)
        self.tb.hparams(_hparams(self.cfg, self.overrides, self.params, self.plain))

    def improves(self, row: Dict[str, float]) -> bool:
        """Whether an evaluated epoch beats the best so far, ranked as train() ranks it."""
        return improves(row, self.best, best_score(self.regs))


def write_scalars(tb: TBLogger, values: Dict[str, float], step: int) -> None:
    """``tb.scalars(values, step)`` as one event: the same tags, steps and values (each an
    old-style ``simple_value``, as ``add_scalar`` writes it), one queue hand-off, not one per tag."""
    if tb is None or not tb.writer:
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
    tb.writer._get_file_writer().add_summary(summary, step)


def write_histograms(tb: TBLogger, state: Dict[str, torch.Tensor], epoch: int) -> None:
    tb.tensor_histograms({f"weights/{name}": t for name, t in state.items()}, epoch)


def checkpoint_dict(m: Member, state: Dict[str, torch.Tensor], opt_state: List[Dict[str, torch.Tensor]],
                    total_steps: int, lr_final: float, perm: Optional[torch.Tensor],
                    running: torch.Tensor, best_state, steps_done: Optional[int] = None,
                    step_in_epoch: int = 0, probe_state: Optional[Dict[str, Any]] = None,
                    factor: Optional[float] = None) -> Dict[str, Any]:
    """The dict train() saves as checkpoint.pt, rebuilt from the member's slices.

    ``total_steps`` is the schedule's length, ``steps_done`` the optimizer steps taken (all of
    them by default), ``step_in_epoch`` those of the unfinished epoch ``m.epochs + 1``: with
    them train() resumes an interrupted member where it stopped. ``probe_state``: its probes'
    generator (None without probes). ``opt_state`` lists the weights' entries, then those of
    the regularizers' own groups (a learned mixture), whose lr is their base lr times the
    schedule's ``factor``."""
    done = total_steps if steps_done is None else steps_done
    m.model.load_state_dict(state)
    params = [p for p in m.model.parameters() if p.requires_grad]
    groups = [{"params": params}] + [g for r in m.regs for g in r.param_groups()]  # as train() groups them
    optimizer = build_optimizer(m.cfg.optimizer, groups, torch.device("cpu"))
    for p, s in zip([p for g in optimizer.param_groups for p in g["params"]], opt_state):
        if s:
            optimizer.state[p] = s
    scheduler = build_scheduler(m.cfg.scheduler, optimizer, total_steps)
    lrs = [lr_final] + [g["initial_lr"] * factor for g in optimizer.param_groups[1:]]
    sd = scheduler.state_dict()
    sd.update(last_epoch=done, _step_count=done + 1, _last_lr=lrs)
    scheduler.load_state_dict(sd)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    rng = rng_state()
    rng["torch"] = m.dropout_gen.get_state()
    return {
        "config": m.plain, "status": m.status, "epoch": m.epochs,
        "step_in_epoch": step_in_epoch, "perm": perm, "running": running, "model": m.model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "regularizers": [r.state_dict() for r in m.regs], "history": m.history, "best": m.best,
        "best_state": best_state, "order": m.order.get_state(), "rng": rng,
        **checkpoint_fields(probe_state, m.probe_history),
    }


def finish(m: Member, device: torch.device, state: Optional[Dict[str, torch.Tensor]] = None,
           best_state: Optional[Dict[str, torch.Tensor]] = None, checkpoint: Optional[Dict[str, Any]] = None,
           diverged_epoch: Optional[int] = None, tensors=None, eval_batch: int = 4096) -> Dict[str, Any]:
    """Write the member's final files (metrics.json last, as train() does) and return its metrics.

    ``state`` is loaded into the member's lone model, so each regularizer's ``report`` sees
    exactly the model a lone run would end with (MC-dropout accuracy and the like).
    """
    from regexp.train.trainer import evaluate

    if checkpoint is not None:
        save_torch(m.out_dir / "checkpoint.pt", checkpoint)
    final = m.history[-1] if m.history else None
    extra: Dict[str, float] = {}
    if m.status == "completed" and state is not None:
        if best_state is not None and any(r.restores_best for r in m.regs):
            state, final = best_state, m.best  # as train(): the best epoch's weights are the final ones
        m.model.load_state_dict(state)
        # A lone run's reports draw (MC dropout) from the global generator where training left
        # it, which is the member's dropout generator state; restore ours afterwards.
        saved = torch.get_rng_state()
        torch.set_rng_state(m.dropout_gen.get_state())
        for r in m.regs:
            extra.update(r.report(m.model, tensors, lambda mod, x, y: evaluate(mod, x, y, eval_batch)))
        torch.set_rng_state(saved)
        save_torch(m.out_dir / "model.pt", state)
        if best_state is not None:
            save_torch(m.out_dir / "best_model.pt", best_state)
    metrics = run_metrics(m.status, m.epochs, final, m.best, m.history, m.params, m.t0, device,
                          torch.get_num_threads(), m.threads_reason, m.overrides, extra,
                          m.plain, m.record)
    if m.tuning:  # beside threads_reason: what this machine's measurement chose for the bucket
        items = list(metrics.items())
        at = list(metrics).index("threads_reason") + 1
        metrics = dict(items[:at] + [("population_tuning", m.tuning)] + items[at:])
    metrics.update(metrics_fields(bool(active(m.cfg.probe)), m.final_probes, m.probe_history))
    if m.stopped:
        metrics["stopped_epoch"] = m.epochs
    if diverged_epoch is not None:
        metrics["diverged_epoch"] = diverged_epoch
    if m.status == "pruned":
        metrics["pruned_epoch"] = m.epochs
    if m.status == "interrupted" and m.signal is not None:
        metrics["signal"] = int(m.signal)
    if m.tb is not None:
        m.tb.final_metrics(metrics)
        m.tb.close()
    write_json(m.out_dir / "metrics.json", metrics)
    return metrics


def finite(values: List[float]) -> bool:
    return all(math.isfinite(v) for v in values)
