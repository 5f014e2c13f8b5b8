"""Buckets of one sweep trained side by side in single-threaded worker processes.

Two processes with one torch thread each use two cores far better than one process with two
threads on the small matrix products of a population (each parallel region's fork/join costs
more than it saves), so ``extra.population.workers`` spreads whole buckets over processes.
A member's computation does not depend on the process that runs it: a worker rebuilds each
member from its resolved config and calls :func:`train_bucket` exactly as the in-process path
does, so every member's files are the same (weights bit for bit at equal thread counts).

Workers are spawned (see :func:`run_in_workers`), get plain containers, and report back over a queue; the parent keeps the sweep's progress and rows.
Each worker installs the process-wide stop flag (``regexp.train.signals``): Ctrl-C reaches it
through the process group, SIGTERM through the parent's forwarding, and it stops its bucket at
a step boundary with resumable checkpoints, then starts no other.
"""
from __future__ import annotations

import math
import queue as queue_mod
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from regexp.errors import ConfigError


# Starting a worker costs the torch + regexp imports and its own data set-up: ~3 CPU-seconds
# (10 s wall on the loaded 2-core EPYC), 3.8 CPU-seconds on the 2-core Xeon. Two workers pay
# only when each gets several times that in training work: at 100 GFLOP each the bench sweep
# (209 GFLOP, 20 epochs) took 8.8-10.4 s wall against 6.6-6.9 s in one process on the Xeon
# (14.3 against 6.6 CPU-seconds). 500 GFLOP is 12-50 s of one core at the population's 10-40
# GFLOP/s on either CPU, over three times the start-up cost.
MIN_WORKER_FLOPS = 500e9
# A bucket step costs a fixed dispatch time besides its products (tens of small kernels and
# the optimizer's per-tensor calls): counted as this many FLOPs so that many cheap steps of a
# narrow bucket weigh in the balance (~0.2 ms at the rates above; an estimate).
STEP_OVERHEAD_FLOPS = 3e6


@dataclass
class BucketJob:
    """One bucket to train: its points' indices, padded width, and estimated work."""
    idx: List[int]
    width: int
    widths: List[Any]  # the distinct widths it holds (for the log and failure lines)
    threads: int  # torch threads the in-process path uses for it
    flops: float  # estimated training work, FLOPs (steps x (products + dispatch))


def balance(costs: Sequence[float], n: int) -> List[List[int]]:
    """Indices of ``costs`` split into ``n`` lists by greedy longest-first: each job, costliest
    first, goes to the least loaded list (within 4/3 of the optimal makespan)."""
    loads = [0.0] * n
    plans: List[List[int]] = [[] for _ in range(n)]
    for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
        w = min(range(n), key=lambda k: loads[k])
        plans[w].append(j)
        loads[w] += costs[j]
    return plans


def check_workers(value: Union[int, str]) -> Union[int, str]:
    """``extra.population.workers``: "auto" or an int >= 1; ConfigError otherwise."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"extra.population.workers={value!r} is invalid: expected \"auto\" or an integer >= 1")
    return value


def worker_count(requested: Union[int, str], jobs: Sequence[BucketJob], device: torch.device) -> Tuple[int, str]:
    """(worker processes, reason): 1 on a GPU (one device, one process feeds it) or for one
    bucket; an int is honoured up to the buckets; auto takes the usable cores, no more than
    one per :data:`MIN_WORKER_FLOPS` of work."""
    from regexp.train.threads import usable_cores

    if device.type != "cpu":
        return 1, f"{device.type}: buckets train in this process"
    if len(jobs) <= 1:
        return 1, "one bucket"
    import multiprocessing as mp

    method = mp.get_start_method(allow_none=True)
    if mp.current_process().daemon or method not in (None, "fork", "spawn", "forkserver"):
        # a launcher's worker (Hydra's joblib: start method "loky") is already one of the
        # sweep's parallel jobs; a child spawned from it cannot even unpickle its start method
        return 1, f"inside a launcher's worker process (start method {method}): buckets train in this process"
    if requested != "auto":
        return min(int(requested), len(jobs)), f"requested: {requested}"
    cores = usable_cores()
    total = sum(j.flops for j in jobs)
    n = max(1, min(cores, len(jobs), math.floor(total / MIN_WORKER_FLOPS)))
    return n, f"auto: {n} ({cores} usable cores, {len(jobs)} buckets, {total / 1e12:.2f} TFLOP)"


def worker_threads(requested: Union[int, str, None], workers: int) -> int:
    """Torch threads per worker: an explicit ``trainer.threads`` is honoured, auto shares the
    usable cores (one each on two cores: two threads per worker on two cores are ~4x slower)."""
    from regexp.train.threads import usable_cores

    if requested is not None and str(requested) != "auto":
        return int(requested)
    return max(1, usable_cores() // workers)


def _member_spec(m) -> Dict[str, Any]:
    return {"point": m.point, "cfg": m.plain, "out": str(m.out_dir),
            "overrides": list(m.overrides), "resume": m.resume is not None, "record": dict(m.record)}


def _rebuild(spec: Dict[str, Any], reason: str):
    """The member the parent set up, from its plain description (checkpoint re-read here)."""
    from omegaconf import OmegaConf

    from regexp.population.member import Member
    from regexp.train.trainer import resumable_checkpoint

    out = Path(spec["out"])
    ck = resumable_checkpoint(out / "checkpoint.pt", spec["cfg"]) if spec["resume"] else None
    return Member(spec["point"], OmegaConf.create(spec["cfg"]), out, spec["overrides"], resume=ck,
                  threads_reason=reason, record=spec["record"], plain=spec["cfg"])


def _worker_main(wid: int, jobs: List[Dict[str, Any]], opts: Dict[str, Any], threads: int, reason: str,
                 q) -> None:
    """One worker: its buckets in order; every message is (kind, worker id, ...)."""
    from regexp.population.engine import Options, train_bucket
    from regexp.train import signals

    signals.install()
    torch.set_num_threads(threads)
    data_cache: Dict[str, Any] = {}
    for job in jobs:
        if signals.requested() is not None:  # asked to stop: start no new bucket
            break
        try:
            members = [_rebuild(s, reason) for s in job["members"]]
            index = {id(m): i for m, i in zip(members, job["idx"])}
            if members[0].cfg.trainer.deterministic:
                torch.use_deterministic_algorithms(True)
            trained = train_bucket(members, job["width"], Options(**opts), data_cache,
                                   on_epoch=lambda live: q.put(("epoch", wid, [index[id(m)] for m in live])),
                                   on_finish=lambda m, metrics: q.put(("finish", wid, index[id(m)], metrics)))
            q.put(("bucket", wid, job["idx"], trained))
        except Exception as e:  # the whole bucket failed, as in-process: the parent records it
            msg = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            q.put(("failed", wid, job["idx"], msg, traceback.format_exc()))
    q.put(("done", wid))


@dataclass
class Handlers:
    """What the parent does with the workers' reports (indices are the sweep's points)."""
    epoch: Callable[[List[int]], None]
    finish: Callable[[int, Dict[str, Any]], None]
    bucket: Callable[[BucketJob, List[Dict[str, Any]]], None]
    failed: Callable[[BucketJob, str, str], None]


def run_in_workers(jobs: List[BucketJob], members: Dict[int, Any], opts, n: int, threads: int,
                   handlers: Handlers, poll: float = 0.2) -> None:
    """Train ``jobs`` in ``n`` spawned workers, balanced by their estimated FLOPs.

    Returns once every worker has ended; a worker that dies without reporting a bucket (killed,
    out of memory) has that bucket and its later ones recorded as failed. The workers are
    terminated if the parent itself is interrupted hard (a second Ctrl-C)."""
    import torch.multiprocessing as mp

    # spawn, not fork (this process's torch thread pools may be running) nor forkserver (its
    # workers are the server's children: the stop flag's SIGTERM forwarding, which reaches
    # this process's own children, would kill the server instead of reaching them)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    plans = balance([j.flops for j in jobs], n)
    reason = f"workers: {threads} per worker process, {n} worker processes"
    for m in members.values():
        m.threads_reason = reason
    opt_dict = asdict(opts)
    procs = []
    for wid, plan in enumerate(plans):
        spec = [{"idx": jobs[j].idx, "width": jobs[j].width,
                 "members": [_member_spec(members[i]) for i in jobs[j].idx]} for j in plan]
        procs.append(ctx.Process(target=_worker_main, args=(wid, spec, opt_dict, threads, reason, q),
                                 name=f"regexp-population-{wid}", daemon=True))
    open_jobs = {wid: [jobs[j] for j in plan] for wid, plan in enumerate(plans)}
    by_idx = {tuple(j.idx): j for j in jobs}
    try:
        for p in procs:
            p.start()
        running = set(range(len(procs)))

        def handle(msg) -> None:
            kind, wid = msg[0], msg[1]
            if kind == "epoch":
                handlers.epoch(msg[2])
            elif kind == "finish":
                handlers.finish(msg[2], msg[3])
            elif kind in ("bucket", "failed"):
                job = by_idx[tuple(msg[2])]
                open_jobs[wid].remove(job)
                handlers.bucket(job, msg[3]) if kind == "bucket" else handlers.failed(job, msg[3], msg[4])
            elif kind == "done":
                running.discard(wid)

        while running:
            try:
                handle(q.get(timeout=poll))
                continue
            except queue_mod.Empty:
                pass
            for wid in [w for w in running if not procs[w].is_alive()]:
                # what it wrote before dying is in the pipe already: read it all first
                try:
                    while True:
                        handle(q.get(timeout=poll))
                except queue_mod.Empty:
                    pass
                if wid in running:
                    running.discard(wid)
                    code = procs[wid].exitcode
                    for job in list(open_jobs[wid]):
                        handlers.failed(job, f"worker process exited with code {code}", "")
                    open_jobs[wid] = []
    finally:
        for p in procs:
            if p.pid is not None:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
                    p.join()
        q.close()


__all__ = ["BucketJob", "Handlers", "MIN_WORKER_FLOPS", "balance", "check_workers", "run_in_workers",
           "worker_count", "worker_threads"]
