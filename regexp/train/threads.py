"""How many torch threads a CPU run should use (``trainer.threads=auto``).

Two things decide it, both measured at start-up, never tuned to one CPU:

* the work of one training step (:func:`step_flops`): below :data:`THRESHOLD` FLOPs a second
  thread does not pay for its synchronisation, so auto picks 1;
* the cores that are idle right now (:func:`idle_cores`): a thread on a core that another
  process keeps busy stalls every parallel region of the step (84 s instead of 8 s for the
  default MLP with two busy neighbours on 2 cores), so auto never asks for more.

Parallel jobs of one launch share them: each of ``jobs`` gets ``min(physical // jobs, idle)``
(at least 1); :func:`launcher_jobs` reads ``jobs`` from the Hydra launcher.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

# FLOPs per training step (forward + backward, 2 per multiply-add) below which auto uses one
# thread. Measured with `python scripts/bench.py --thread-scaling` (MLPs 32x1 .. 2048x2, the
# default CNN and transformer, MNIST-1D shape, batch 32..1000, fused Adam; two runs, medians)
# on "Intel(R) Xeon(R) Processor" (lscpu; AVX-512 + AMX, 2.6 GHz, KVM guest, 2 vCPUs): 2
# threads are no faster (0.93-1.08x) up to 9 MFLOP/step, reach 1.2x between 47 and 55 MFLOP,
# and are 1.28-1.98x faster at every size from 90 MFLOP up. 100 MFLOP is ~2x the crossover. Not
# yet measured on AMD EPYC; why it should hold there: the crossover is where the parallel GEMM
# time saved outweighs a fixed per-step cost of the second thread (fork/join per op, of the
# order of 0.5 ms here), so it scales with overhead x per-core GEMM rate. A slower core (EPYC's
# AVX2 / half-rate AVX-512 vs this AVX-512 Xeon) lowers it; a costlier barrier (cross-CCX)
# raises it, and even 2x higher it would put models at the threshold at ~1.2x, while 2 threads
# are slower than 1 (< 1x) only below ~30 MFLOP, 3x lower. Erring towards one thread costs at
# most the speed-up given up; a second thread on a busy core costs 2-10x (bench run with ~1.3
# cores busy).
THRESHOLD = 100e6

_STAT = Path("/proc/stat")
_IDLE_SLACK = 0.2  # a 100 ms window is 10 ticks per core (USER_HZ=100): +-1 tick of noise


def _cpu_ticks(cpus: Set[int]) -> Tuple[int, int]:
    """(busy, total) jiffies summed over ``cpus`` since boot, from /proc/stat."""
    busy = total = 0
    for line in _STAT.read_text().splitlines():
        if not line.startswith("cpu") or line[3] == " ":  # skip the aggregate "cpu " line
            continue
        name, *vals = line.split()
        if int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
        total += sum(v)
        busy += sum(v) - v[3] - v[4]
    return busy, total


def _own_ticks() -> int:
    """utime + stime of this process (all its threads), in the same jiffies as /proc/stat."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after "pid (comm)"


def _cgroup_quota(root: Path = Path("/")) -> Optional[float]:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max or v1 cfs), None if unlimited.

    ``root`` is for tests. A container's /proc/stat shows the host's CPUs; the quota is what
    this container may actually use of them.
    """
    try:
        for line in (root / "proc/self/cgroup").read_text().splitlines():
            _, ctrl, path = line.split(":", 2)
            rel = path.lstrip("/")
            if ctrl == "":  # cgroup v2
                f = root / "sys/fs/cgroup" / rel / "cpu.max"
                if f.exists():
                    quota, period = f.read_text().split()
                    return None if quota == "max" else int(quota) / int(period)
            elif "cpu" in ctrl.split(","):  # cgroup v1; inside a container the path is often "/"
                for d in (root / "sys/fs/cgroup/cpu" / rel, root / "sys/fs/cgroup/cpu"):
                    q = d / "cpu.cfs_quota_us"
                    if q.exists():
                        quota = int(q.read_text())
                        return None if quota <= 0 else quota / int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        pass
    return None


def _allowed_cpus() -> Set[int]:
    try:
        return set(os.sched_getaffinity(0))  # taskset / cpuset cgroup / Slurm binding
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: Optional[Set[int]] = None) -> int:
    """Physical cores among ``cpus`` (SMT siblings count once), as torch's default does."""
    cpus = _allowed_cpus() if cpus is None else cpus
    cores: Set[Tuple[str, ...]] = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(tuple((topo / f).read_text().strip() for f in ("physical_package_id", "core_id")))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def usable_cores(cpus: Optional[Set[int]] = None) -> int:
    """Cores this process may use at all: its affinity, capped by the cgroup quota."""
    cpus = _allowed_cpus() if cpus is None else cpus
    quota = _cgroup_quota()
    return len(cpus) if quota is None else max(1, min(len(cpus), math.floor(quota)))


def idle_cores(window: float = 0.1) -> int:
    """Cores this process may use that nothing else keeps busy, measured over ``window`` s.

    Busy jiffies of the allowed CPUs over the window, less this process's own (its other
    threads, e.g. OpenMP workers still spinning after a parallel region, are not "others"),
    give the cores other processes occupy; the rest, rounded down (with a tick of slack for
    the 100 Hz counters), capped by the cgroup quota, and at least 1. Costs ``window`` seconds.
    """
    cpus = _allowed_cpus()
    cap = usable_cores(cpus)
    try:
        b0, t0, o0 = *_cpu_ticks(cpus), _own_ticks()
        time.sleep(window)
        b1, t1, o1 = *_cpu_ticks(cpus), _own_ticks()
    except (OSError, ValueError, IndexError):  # no /proc (macOS) or an unexpected format
        return cap
    if t1 <= t0:
        return cap
    others = max(0, (b1 - b0) - (o1 - o0)) / (t1 - t0)  # fraction of the allowed CPUs' time
    idle = math.floor(len(cpus) * (1 - others) + _IDLE_SLACK)
    return max(1, min(cap, idle))


def step_flops(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> float:
    """FLOPs of one training step: 3x the forward (backward ~2x), counted on one example.

    torch's FlopCounterMode counts matmuls, convolutions and attention (the work threads
    split), not elementwise ops. The probe runs on the meta device (parameters and buffers
    swapped for meta stand-ins, nothing computed, the model and RNG untouched) in eval mode,
    since BatchNorm refuses a batch of one in training; grad stays enabled so that
    TransformerEncoderLayer takes its ordinary, countable path, not the inference fast path.
    Call it before regularizers attach hooks (they would run on meta tensors). ~5 ms for the
    default MLP and CNN, ~30 ms for the transformer, once torch's optimizers are imported.
    """
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    meta = {k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad)
            for k, v in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.zeros(1, *input_shape, device="meta", dtype=dtype)
    modes: Dict[nn.Module, bool] = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with counter:
            functional_call(model, meta, (x,))
    except Exception:  # a model the meta probe cannot run: each weight once per example, a
        # lower bound (convolutions and attention reuse weights), which errs towards one thread
        return 6.0 * batch_size * sum(q.numel() for q in model.parameters())
    finally:
        for m, training in modes.items():
            m.training = training
    return 3.0 * batch_size * counter.get_total_flops()


def _fmt(flops: float) -> str:
    return f"{flops / 1e9:.1f} GFLOP" if flops >= 1e9 else f"{flops / 1e6:.1f} MFLOP"


def choose_threads(requested: Union[int, str, None], flops_per_step: float,
                   jobs: int = 1) -> Tuple[int, str]:
    """(threads, reason) for ``trainer.threads``: an int >= 1 is honoured; "auto" (or None)
    gives 1 below :data:`THRESHOLD` FLOPs per step, else ``min(physical // jobs, idle)``."""
    if requested is not None and str(requested) != "auto":
        n = int(requested)
        if n < 1:
            raise ValueError(f"threads must be >= 1 or 'auto', got {requested!r}")
        return n, f"requested: {n}"
    if flops_per_step < THRESHOLD:
        return 1, f"auto: 1 (step {_fmt(flops_per_step)} < {_fmt(THRESHOLD)})"
    # OMP_NUM_THREADS, if set, is the user's ceiling as it is for torch's default.
    env = os.environ.get("OMP_NUM_THREADS", "")
    ceiling = int(env) if env.isdigit() and int(env) >= 1 else physical_cores()
    idle = idle_cores()
    # Each of ``jobs`` parallel jobs gets its share of the cores, and never more than the idle
    # ones; a job starting after its siblings sees them busy already, so its share is not
    # divided again.
    n = max(1, min(ceiling // max(1, jobs), idle))
    share = f", {jobs} jobs" if jobs > 1 else ""
    return n, f"auto: {n} (step {_fmt(flops_per_step)}, {idle} idle of {ceiling} cores{share})"


def set_threads(requested: Union[int, str, None], device: torch.device,
                flops: Callable[[], float]) -> Tuple[int, str]:
    """Choose and set torch's intra-op threads for a run on ``device``; (threads, reason).
    ``flops`` (the step's FLOPs) is only evaluated when auto has to decide on a CPU."""
    if device.type != "cpu":
        n = torch.get_num_threads()
        return n, f"{device.type}: the host threads only feed the device ({n})"
    auto = requested is None or str(requested) == "auto"
    n, why = choose_threads(requested, flops() if auto else 0.0, launcher_jobs())
    torch.set_num_threads(n)
    return n, why


def launcher_jobs() -> int:
    """How many jobs of this launch run at once on this machine (the parallel launcher's
    ``n_jobs`` / ``tasks_per_node``); 1 outside Hydra or with an explicit ``cpus_per_task``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if launcher.get("cpus_per_task") is not None:  # SLURM gives each job its own cores
        return 1
    return int(launcher.get("n_jobs") or launcher.get("tasks_per_node") or 1)


__all__: List[str] = ["THRESHOLD", "choose_threads", "idle_cores", "launcher_jobs", "physical_cores", "set_threads",
                      "step_flops", "usable_cores"]
