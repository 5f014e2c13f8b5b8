"""Train the points of a sweep as populations: group, bucket by width, train each bucket.

Each point keeps its own folder (``point_name(point)``) and leaves there what a lone
``train()`` would. A point whose folder holds a completed run is skipped; one holding an
unfinished lone run (``checkpoint.pt``) is resumed by ``train()`` itself; a point that fails
validation is recorded as failed, like the serial sweep does.
"""
from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from regexp.errors import ConfigError
from regexp.optim import build_optimizer
from regexp.population.compat import bucket_width, bucket_widths, incompatibility, member_cost, shared_part
from regexp.population.data import data_key, load_cached
from regexp.population.engine import Options, small_for, train_bucket
from regexp.population.member import Member
from regexp.population.tuning import checked_loop_width
from regexp.population.workers import (STEP_OVERHEAD_FLOPS, BucketJob, Handlers, check_workers, run_in_workers,
                                       worker_count, worker_threads)
from regexp.train import signals
from regexp.train.threads import set_threads

if TYPE_CHECKING:
    from regexp.progress import SweepProgress

log = logging.getLogger("regexp.population")
ENGINES = ("auto", "serial", "population")


def options(base: DictConfig) -> Options:
    """``extra.population`` of the sweep's config, checked against :class:`Options`."""
    node = base.extra.get("population")
    given = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    known = Options.__dataclass_fields__
    for k in given:
        if k not in known:
            raise ConfigError(f"extra.population.{k} is unknown: expected one of {', '.join(known)}")
    opts = Options(**given)
    opts.loop_width = checked_loop_width(opts.loop_width)
    if opts.small_width is not None and (isinstance(opts.small_width, bool) or not isinstance(opts.small_width, int)
                                         or opts.small_width < 0):
        raise ConfigError(f"extra.population.small_width={opts.small_width!r} is invalid: expected an integer >= 0 "
                          "(or null: the model's own)")
    if opts.bucket_ratio < 1:
        raise ConfigError(f"extra.population.bucket_ratio={opts.bucket_ratio} is invalid: expected >= 1")
    check_workers(opts.workers)
    return opts


def choose_engine(base: DictConfig, points: List[Dict[str, Any]]) -> Tuple[str, Optional[str]]:
    """``("population", None)``, or ``("serial", why)`` when the points train one at a time.

    ``sweep.engine=population`` with an incompatible point raises ConfigError instead."""
    from regexp.sweep import point_config, point_name

    engine = base.sweep.get("engine", "auto")
    if engine not in ENGINES:
        raise ConfigError(f"sweep.engine={engine!r} is invalid: expected one of {', '.join(ENGINES)}")
    if engine == "serial":
        return "serial", "sweep.engine=serial"
    if not points:
        return "serial", "no points to train"
    # Points differ from the base only in their keys, and member keys never change what a
    # population supports: one config per distinct combination of the other keys suffices.
    distinct = {json.dumps(shared_part(p), sort_keys=True, default=str): p for p in points}
    for point in distinct.values():
        try:
            cfg = point_config(base, point)
        except ConfigError as e:  # run_points' own error handling reports it, point by point
            if engine == "population":
                return "population", None
            return "serial", f"point {point_name(point)} has an invalid config ({e})"
        why = incompatibility(cfg)
        if why is not None:
            if engine == "population":
                raise ConfigError(f"sweep.engine=population is invalid for this sweep: {why}; "
                                  "use sweep.engine=serial or auto")
            return "serial", why
    return "population", None


def use_population(base: DictConfig, points: List[Dict[str, Any]]) -> bool:
    """Whether ``sweep.engine`` asks for (or, on auto, allows) population training. On auto,
    training serially is never silent: one line says why (``choose_engine``)."""
    engine, why = choose_engine(base, points)
    if engine == "serial" and base.sweep.get("engine", "auto") == "auto" and points:
        log.info(auto_serial_message(why))
    return engine == "population"


def auto_serial_message(why: Optional[str]) -> str:
    return f"sweep.engine=auto trains the points serially, one run at a time: {why}"


def _failed(out: Path, msg: str, overrides: List[str]) -> Dict[str, Any]:
    from regexp.train.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "metrics.json").exists():
        write_json(out / "metrics.json", {"status": "failed", "error": msg, "overrides": overrides})
    return {"status": "failed", "error": msg}


def _plan(members: Dict[int, Member], pending: Dict[str, List[int]], opts: Options,
          data_cache: Dict[str, Any]) -> Tuple[List[BucketJob], torch.device]:
    """Every group's buckets, with the threads and the work each needs; and the device (the
    first non-CPU one, if any: then everything stays in this process)."""
    from regexp.train.trainer import resolve_device

    jobs: List[BucketJob] = []
    device = torch.device("cpu")
    for idx in pending.values():
        t = members[idx[0]].cfg.trainer
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        first = members[idx[0]].cfg
        ds = load_cached(first, data_cache, data_key(first, members[idx[0]].point))
        # members listing their hidden widths (model.widths, a member key) are bucketed by the
        # cost of their whole list, each depth apart; a CNN's by its channels, each depth apart;
        # the others by their one width
        listed = first.model.name == "mlp" and any(members[i].cfg.model.get("widths") is not None for i in idx)
        cost = member_cost(first, ds.input_shape, ds.num_classes, listed)
        if "ensemble" in first.regularizer:  # a member computes its K models (population/ensemble.py)
            cost = (lambda c, k: lambda w: k * c(w))(cost, int(first.regularizer.ensemble.components))
        shape = (lambda i: tuple(members[i].widths)) if listed else (lambda i: members[i].width)
        # the group's step: every member's forward and backward (3 x 2 FLOPs per multiply-add)
        bs = len(ds.y_train) if t.batch_size == "full" else int(t.batch_size)
        group_device = resolve_device(t.device)
        if group_device.type != "cpu":
            device = group_device
        threads, why = set_threads(t.threads, group_device, lambda: 6.0 * bs * sum(cost(shape(i)) for i in idx))
        for i in idx:
            members[i].threads_reason = why
        steps = math.ceil(len(ds.y_train) / bs)
        depths = sorted({len(members[i].widths) for i in idx})
        for widths in [b for d in depths for b in bucket_widths([shape(i) for i in idx if len(members[i].widths) == d],
                                                                 opts.bucket_ratio, small_for(opts, first.model.name), cost)]:
            chosen = [i for i in idx if shape(i) in widths]
            top = bucket_width([members[i].width for i in chosen])
            # members compute the padded shape (or less, member by member)
            padded = top if not listed else max(widths, key=cost)
            left = sum(t.epochs - members[i].position[0] for i in chosen) * steps
            flops = left / len(chosen) * (6.0 * bs * cost(padded) * len(chosen) + STEP_OVERHEAD_FLOPS)
            jobs.append(BucketJob(chosen, top, widths, threads, flops))
    return jobs, device


def train_population(base: DictConfig, points: List[Dict[str, Any]], sweep_dir: Path,
                     opts: Optional[Options] = None, progress: Optional["SweepProgress"] = None
                     ) -> List[Dict[str, Any]]:
    """Train every point; return each point's metrics (as ``train()`` returns them), in order.

    With ``progress`` (a sweep's :class:`regexp.progress.SweepProgress`, over ``points``): its bar
    advances by the live members after each epoch of a bucket, names the bucket, and each point
    logs its ``[i/n]`` line when it finishes; the buckets' own bars are then off. Without it
    (a direct call), each bucket has its tqdm bar (``trainer.progress``) and no line per point."""
    from regexp.sweep import checked_config, point_job, point_name, result_row
    from regexp.train.trainer import _prepare_dir, resumable_checkpoint

    opts = opts or options(base)
    results: List[Optional[Dict[str, Any]]] = [None] * len(points)
    pending: Dict[str, List[int]] = {}
    members: Dict[int, Member] = {}
    for i, point in enumerate(points):
        out, overrides = point_job(point, sweep_dir)
        try:
            cfg = checked_config(base, point)
            # the optimizer checks train() makes when it builds one (nesterov needs momentum ...)
            build_optimizer(cfg.optimizer, [{"params": [torch.zeros(1, requires_grad=True)]}],
                            torch.device("cpu"))
            out.mkdir(parents=True, exist_ok=True)
            config = OmegaConf.to_container(cfg, resolve=True)
            done = _prepare_dir(out, cfg.trainer, True, config)
            if done is not None:
                results[i] = done
            else:
                # an unfinished run (interrupted population or lone run) goes on from its checkpoint
                ck = (resumable_checkpoint(out / "checkpoint.pt", config)
                      if (out / "checkpoint.pt").exists() else None)
                members[i] = Member(point, cfg, out, overrides, resume=ck, plain=config)
                # as a lone run's metrics.json says how it was trained (LONE_RUN)
                members[i].record = {"engine": "population", "engine_reason": "a sweep's population"}
                # all points share the base, so the non-member keys of a point decide its group;
                # members that resume train together with those stopped at the same step
                key = json.dumps([shared_part(point), members[i].position], sort_keys=True, default=str)
                pending.setdefault(key, []).append(i)
        except Exception as e:  # recorded like run_points records it; the sweep goes on
            msg = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            log.error("point %s failed: %s\n%s", point_name(point), msg, traceback.format_exc())
            results[i] = _failed(out, msg, overrides)

    on_epoch = on_finish = None
    if progress is not None:
        for i in range(len(points)):  # what earlier launches did: the bar starts there
            if results[i] is not None:
                progress.start(i, progress.epochs[i])
            elif members[i].resume is not None:
                progress.start(i, members[i].position[0])
        progress.open()
        for i, r in enumerate(results):  # skipped as done, or failed at set-up
            if r is not None:
                progress.finish(i, result_row(points[i], r))
        index = {id(m): i for i, m in members.items()}

        def on_epoch(live: List[Member]) -> None:
            progress.advance(index[id(m)] for m in live)

        def on_finish(m: Member, metrics: Dict[str, Any]) -> None:
            progress.finish(index[id(m)], result_row(m.point, metrics))

    data_cache: Dict[str, Any] = {}  # each (data config, seed) is loaded once for all buckets
    jobs, device = _plan(members, pending, opts, data_cache)

    def record_failure(job: BucketJob, msg: str, trace: str) -> None:  # the whole bucket failed
        log.error("population bucket %s failed: %s\n%s", job.widths, msg, trace)
        for i in job.idx:
            results[i] = _failed(members[i].out_dir, msg, members[i].overrides)
            if progress is not None:
                progress.finish(i, result_row(points[i], results[i]))

    def record(job: BucketJob, trained: List[Dict[str, Any]]) -> None:
        for i, metrics in zip(job.idx, trained):
            results[i] = metrics

    n, why = worker_count(opts.workers, jobs, device)
    if n > 1:
        threads = worker_threads(members[jobs[0].idx[0]].cfg.trainer.threads, n)
        log.info("population: %d buckets in %d worker processes, %d thread(s) each (%s)", len(jobs), n, threads, why)
        if progress is not None:
            progress.stage(f"{len(jobs)} buckets in {n} workers")
        run_in_workers(jobs, members, opts, n, threads, Handlers(
            epoch=lambda idx: progress.advance(idx) if progress is not None else None,
            finish=lambda i, metrics: (progress.finish(i, result_row(points[i], metrics))
                                       if progress is not None else None),
            bucket=record, failed=record_failure))
    for job in jobs if n == 1 else []:
        signals.check()  # once asked to stop, start no new bucket
        torch.set_num_threads(job.threads)
        log.info("population: %d members, widths %s padded to %s", len(job.idx), job.widths, job.width)
        if progress is not None:
            progress.stage(f"bucket w<={job.width} x{len(job.idx)}")
        try:
            record(job, train_bucket([members[i] for i in job.idx], job.width, opts, data_cache,
                                     on_epoch=on_epoch, on_finish=on_finish))
        except Exception as e:
            record_failure(job, str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}",
                           traceback.format_exc())
    signals.check()  # the last bucket was interrupted: the sweep stops here too
    return [r if r is not None else {"status": "failed"} for r in results]


LONE_RUN = {"engine": "population", "engine_reason": "a lone run: a population of one member"}


def lone_run_record(cfg: DictConfig) -> Dict[str, str]:
    """How a lone run trains, as its metrics.json records it: as a population of one member,
    through :func:`train_bucket`, the one training loop. A config no stacked model trains
    (a regularizer a model has no site for, regexp/population/compat.py) raises ConfigError."""
    why = incompatibility(cfg)
    if why is not None:
        raise ConfigError(f"this run cannot train: {why}")
    return dict(LONE_RUN)


def train_lone(cfg: DictConfig, out_dir: Path, overrides: List[str], ck: Optional[Dict[str, Any]],
               t0: float, record: Dict[str, Any],
               on_epoch: Optional[Callable[[Dict[str, float]], bool]] = None) -> Dict[str, Any]:
    """Train one run as a population of one member; return its metrics.json content.

    ``train()`` has accepted the folder (and written its hydra files) and read ``ck``, the
    checkpoint to go on from; the member writes a run's files, plus ``record`` (how it was
    trained) in metrics.json. ``on_epoch``: train()'s (a search's
    pruner), called with each evaluated row at the same point of the epoch's end."""
    from regexp.models.summary import model_summary
    from regexp.train.threads import step_flops
    from regexp.train.trainer import build_initial_model, resolve_device

    t = cfg.trainer
    device = resolve_device(t.device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    data_cache: Dict[str, Any] = {}
    member = Member({}, cfg, out_dir, list(overrides), resume=ck, on_row=on_epoch)
    ds = load_cached(cfg, data_cache, data_key(cfg, member.point))
    n = len(ds.y_train)
    bs = n if t.batch_size == "full" else int(t.batch_size)
    # the model train() logs and counts a step's FLOPs on; the member builds its own from the same seed
    model, _, _ = build_initial_model(cfg, ds, device, None)
    logging.getLogger("regexp").info(model_summary(model, ds.input_shape, cfg.model.name))
    _, member.threads_reason = set_threads(t.threads, device, lambda: step_flops(model, ds.input_shape, min(bs, n)))
    member.t0, member.record = t0, dict(record)
    return train_bucket([member], member.width, Options(), data_cache)[0]
