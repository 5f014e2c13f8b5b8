"""Whether a CPU bucket computes member by member: measured on this machine, cached per machine.

On CPU a bucket's step runs either as batched GEMMs over the members (one ``bmm``/``baddbmm``
per layer) or as a loop of plain GEMMs, one member at a time on its unpadded slices
(``StackedMLP.loop``). Which is faster depends on the CPU and its BLAS: a fixed width (256)
tuned on one CPU left another (an AVX-512 Xeon) at 16% of its matmul roof against 42%. So
the first time a bucket shape trains on a machine, both forms of its own step (the hand-written
one or autograd's, whichever the bucket runs) are timed on the bucket's own stacked weights, a
few interleaved steps each (a fraction of a second against the thousands of steps it then
trains), and the faster one is kept in a JSON cache keyed by CPU model, torch version and
thread count, so later runs on that machine reuse it without measuring.

``extra.population.loop_width`` still wins when given: an int (0: never, N: buckets at least
N wide loop); ``auto`` or null is the measurement.

A CNN bucket (StackedCNN) chooses the same way, with the same cache, between its grouped
convolutions and the feature-major GEMM form (regexp/population/conv_gemm.py): the GEMM form
wins where groups hold few channels, oneDNN's grouped convolution where they hold many, and
where the two cross depends on the CPU. The GEMM form's backward is once differentiable, so a
bucket whose penalties differentiate twice (tangent_prop, gradient_norm_penalty) keeps the
grouped form without measuring, as do torch.compile and bf16 runs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from regexp.errors import ConfigError

if TYPE_CHECKING:
    from regexp.population.engine import Bucket

log = logging.getLogger("regexp.population")
VERSION = 1  # bump when the measured step changes: older entries are then measured again
ROUNDS = 7  # interleaved timings per form; the minimum of each is compared
BUDGET_S = 1.0  # after 2 rounds, stop once the measurement has taken this long
_clock: Callable[[], float] = time.perf_counter  # the tests replace it


@dataclass
class Choice:
    """What a bucket runs with and why: written to each member's metrics.json."""
    loop: bool
    source: str  # "measured", "cached", "extra.population.loop_width=N", or the device
    cpu: str
    key: str = ""  # the bucket's shape, as the cache names it
    batched_ms: Optional[float] = None
    loop_ms: Optional[float] = None
    forms: Tuple[str, str] = ("batched", "member by member")  # what loop False / True name

    def line(self, width: int, members: int) -> str:
        form = self.forms[self.loop]
        times = (f" (step {self.batched_ms:.3g} ms {self.forms[0]}, {self.loop_ms:.3g} ms {self.forms[1]})"
                 if self.batched_ms is not None else "")
        return (f"population bucket w<={width} x{members}: {form}, {self.source} on {self.cpu}, "
                f"torch {torch.__version__}, {torch.get_num_threads()} thread(s){times}")


def cpu_model() -> str:
    """The CPU's model name as lscpu and /proc/cpuinfo give it, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_path() -> Path:
    """``$REGEXP_CACHE_DIR``, else ``$XDG_CACHE_HOME/regexp``, else ``~/.cache/regexp``."""
    root = os.environ.get("REGEXP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                      Path.home() / ".cache") / "regexp"
    return Path(root) / "population_tuning.json"


def machine_key(cpu: Optional[str] = None, threads: Optional[int] = None) -> str:
    return (f"{cpu or cpu_model()} | torch {torch.__version__} | "
            f"{threads or torch.get_num_threads()} thread(s)")


def faster_is_loop(batched_s: float, loop_s: float) -> bool:
    """The decision: the member loop only when it is strictly faster (ties stay batched, the
    form every device shares)."""
    return loop_s < batched_s


def _read(path: Path, report: bool = True) -> Dict:
    """The cache's entries, or {} when it is absent; an unreadable or foreign file is reported
    in one line (unless ``report`` is off) and then overwritten with fresh measurements."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        machines = data.get("machines") if isinstance(data, dict) else None
        if (not isinstance(machines, dict) or data.get("version") != VERSION
                or not all(isinstance(v, dict) for v in machines.values())):
            raise ValueError(f"not a version-{VERSION} tuning cache")
        return machines
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        if report:
            log.warning("population tuning cache %s is unreadable (%s): measuring again and rewriting it", path, e)
        return {}


def _write(path: Path, machines: Dict) -> None:
    """Write atomically (parallel jobs of one launch may calibrate at once: the last one's
    entries win, an entry lost to the race is measured again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": VERSION, "machines": machines}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next time, train anyway
        log.warning("population tuning cache %s cannot be written (%s)", path, e)


def _cached(key: str, valid: Callable[[Dict], bool], measure: Callable[[], Dict],
            path: Optional[Path] = None) -> tuple:
    """(entry, True) when this machine's cache holds a ``valid`` entry for ``key``, else
    (``measure()``'s entry, False), which is then stored."""
    path = path or cache_path()
    machine = machine_key()
    hit = _read(path).get(machine, {}).get(key)
    if isinstance(hit, dict) and valid(hit):
        return hit, True
    entry = measure()
    fresh = _read(path, report=False)  # with what other processes wrote meanwhile
    fresh.setdefault(machine, {})[key] = entry
    _write(path, fresh)
    return entry, False


def cached_choice(key: str, measure: Callable[[], tuple], path: Optional[Path] = None,
                  forms: Tuple[str, str] = Choice.forms) -> Choice:
    """The cached decision for bucket shape ``key`` on this machine, or ``measure()``'s
    (seconds per step batched, member by member; or of ``forms``' first and second), which is
    then stored."""
    def measured() -> Dict:
        batched_s, loop_s = measure()
        return {"loop": faster_is_loop(batched_s, loop_s), "batched_ms": round(batched_s * 1e3, 4),
                "loop_ms": round(loop_s * 1e3, 4)}

    hit, cached = _cached(key, lambda e: isinstance(e.get("loop"), bool), measured, path)
    return Choice(hit["loop"], "cached" if cached else "measured", cpu_model(), key, hit.get("batched_ms"),
                  hit.get("loop_ms"), forms)


def time_forms(step: Callable[[bool], None], rounds: int = ROUNDS, budget_s: float = BUDGET_S) -> tuple:
    """(batched, member loop) seconds of ``step(loop)``: one warm-up call each, then
    interleaved rounds (so a burst of load from other processes hits both), the minimum of
    each form (the least disturbed)."""
    for loop in (False, True):
        step(loop)
    best = {False: float("inf"), True: float("inf")}
    start = _clock()
    for r in range(rounds):
        for loop in ((False, True) if r % 2 == 0 else (True, False)):
            t = _clock()
            step(loop)
            best[loop] = min(best[loop], _clock() - t)
        if r >= 1 and _clock() - start > budget_s:
            break
    return best[False], best[True]


def shape_key(b: "Bucket", batch: int, manual: bool) -> str:
    """The bucket's step as the cache names it: the path (hand-written or autograd), the
    activation, the layer sizes, every member's width, the padded width and the batch."""
    net, cfg = b.net, b.members[0].cfg
    penalties = ",".join(b.terms.reg_names) or "none"
    return (f"{'manual' if manual else 'autograd'} {cfg.model.activation} in{net.weights[0].shape[2]} "
            f"out{net.weights[-1].shape[1]} depth{len(net.weights) - 1} widths{sorted(net.widths.tolist())} "
            f"pad{net.width} batch{batch} penalties {penalties}")


def _step(b: "Bucket", batch: int, manual: bool, form: str = "loop") -> Callable[[bool], None]:
    """One training step of the bucket's own stacked weights on random inputs, in either form
    (``form``: the flag the net computes by, ``loop`` or a CNN's ``gemm``); it leaves the weights
    and batch norm's running statistics as they are (only ``.grad``, reset by every real step,
    changes)."""
    net = b.net
    m = len(b.members)
    d = net.in_channels * math.prod(net.spatial) if form == "gemm" else net.weights[0].shape[2]
    classes = net.classes if form == "gemm" else net.weights[-1].shape[1]
    gen = torch.Generator(device=b.device).manual_seed(0)  # never the members' generators
    x = torch.randn(m, batch, d, generator=gen, device=b.device)
    y = torch.randint(0, classes, (m, batch), generator=gen, device=b.device)
    kept = [t.clone() for t in getattr(net, "buffers", [])]

    def step(flag: bool) -> None:
        setattr(net, form, flag)
        if manual:
            net.manual_step(x, y)
            return
        # the data loss alone: the products are what the two forms differ in, and a penalty may
        # need the step's own batch state (heads' rows, a pretext's masks) this stand-in lacks
        loss = b.terms.loss(net.forward(x), y)
        for p in net.params:
            p.grad = None
        loss.sum().backward()
        for t, k in zip(getattr(net, "buffers", []), kept):
            t.copy_(k)

    return step


def checked_loop_width(value: Union[int, str, None]) -> Union[int, str, None]:
    """``extra.population.loop_width`` as given: an int >= 0, or "auto"/null (measured)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"extra.population.loop_width={value!r} is invalid: expected an integer >= 0 "
                          "(0: never member by member) or auto (measured on this machine)")
    return value


CNN_FORMS = ("grouped convolutions", "GEMM form")


def cnn_key(b: "Bucket", batch: int) -> str:
    """A CNN bucket's step as the cache names it: input, stages, every member's channels, the
    padded ones, the head and the batch."""
    net = b.net
    stages = [(st.kernel, st.padding, st.pool, st.norm, type(st.act).__name__) for st in net.stages]
    return (f"cnn in{net.in_channels}x{'x'.join(map(str, net.spatial))} stages{stages} "
            f"channels{sorted(map(tuple, net.widths.tolist()))} pad{list(net.width_tuple)} "
            f"head{'flatten' if net.flatten else 'gap'} batch{batch}")


def choose_form(b: "Bucket", batch: int, grouped_only: Optional[str] = None) -> Choice:
    """Set a CNN bucket's ``b.net.gemm`` (the GEMM form or grouped convolutions) and return
    the choice (logged in one line); ``grouped_only``: why the bucket cannot run the GEMM form
    (a penalty's double backward, torch.compile, bf16), if so."""
    net, cpu = b.net, (cpu_model() if b.device.type == "cpu" else str(b.device))
    if b.device.type != "cpu":
        choice = Choice(False, f"{b.device.type}: grouped", cpu, forms=CNN_FORMS)
    elif not net.gemm_ok:
        choice = Choice(False, "strided or layer/instance-normalized stages (grouped only)", cpu, forms=CNN_FORMS)
    elif grouped_only:
        choice = Choice(False, f"{grouped_only} (grouped only)", cpu, forms=CNN_FORMS)
    else:
        record, hidden = net.record, net.hidden
        choice = cached_choice(cnn_key(b, batch), lambda: time_forms(_step(b, batch, False, "gemm")), forms=CNN_FORMS)
        net.record, net.hidden = record, hidden
        for p in net.params:
            p.grad = None
    net.gemm = choice.loop
    log.info(choice.line(net.width, len(b.members)))
    return choice


def choose_loop(b: "Bucket", loop_width: Union[int, str, None], batch: int, manual: bool) -> Choice:
    """Set ``b.net.loop`` for the bucket's step and return the choice (logged in one line)."""
    width, cpu = b.net.width, (cpu_model() if b.device.type == "cpu" else str(b.device))
    if b.device.type != "cpu":
        choice = Choice(False, f"{b.device.type}: batched", cpu)
    elif b.net.fancy:  # norms (batch norm's running statistics would move), skips, uneven widths
        choice = Choice(False, "norms, skips or uneven widths (the batched form only)", cpu)
    elif loop_width is not None and str(loop_width) != "auto":
        lw = int(loop_width)
        choice = Choice(0 < lw <= width, f"extra.population.loop_width={lw}", cpu, shape_key(b, batch, manual))
    else:
        key = shape_key(b, batch, manual)
        choice = cached_choice(key, lambda: time_forms(_step(b, batch, manual)))
        for p in b.net.params:
            p.grad = None
    b.net.loop = choice.loop
    log.info(choice.line(width, len(b.members)))
    return choice


# Evaluation chunks: how many rows each member's forward takes at once in the per-epoch
# evaluation. Its cost is memory-bound, so the best size depends on the caches and the BLAS: on
# one 2-core Xeon (AVX-512) a population of 40 MLPs of width 100 evaluated 4000 rows in 79 ms
# with 4 MiB chunks against 104 ms with 1 MiB, while a lone narrow MLP gained from 16 MiB. The
# model's own budget (a lower bound that held on every CPU seen) times each scale is timed
# once per bucket shape and cached like the step's form.
EVAL_SCALES = (1, 4, 16)


def eval_key(b: "Bucket", rows: int) -> str:
    """The evaluation as the cache names it: the stack, its form, every member's size, the rows."""
    net = b.net
    sizes = sorted(str(m.width) for m in b.members)
    return (f"eval {type(net).__name__} {'loop' if net.loop else 'batched'} "
            f"{b.members[0].cfg.model.get('activation', '')} in{list(b.data.input_shape)} "
            f"layers{len(net.weights)} widths[{', '.join(sizes)}] pad{net.width} rows{rows}")


def choose_eval_budget(b: "Bucket", base: int, rows: int, evaluate: Callable[[int], None],
                       chunk_of: Callable[[int], int], scales: Sequence[int] = EVAL_SCALES) -> int:
    """The bytes of hidden activations one evaluation chunk may hold for bucket ``b``:
    ``evaluate(budget)`` (one evaluation of ``rows`` examples) timed at ``base`` times each of
    ``scales`` on this machine, or cached; on other devices the largest (launches dominate).
    Budgets giving the same chunk (``chunk_of``: its rows) are timed once, as the smallest."""
    budgets: List[int] = []
    for bud in (base * s for s in scales):
        if not budgets or chunk_of(bud) != chunk_of(budgets[-1]):
            budgets.append(bud)
    if len(budgets) == 1:
        return budgets[0]
    if b.device.type != "cpu":
        return budgets[-1]

    def measured() -> Dict:
        best = {bud: float("inf") for bud in budgets}
        for bud in budgets:  # warm-up: the first call of each size allocates
            evaluate(bud)
        start = _clock()
        for r in range(ROUNDS):
            for bud in (budgets if r % 2 == 0 else budgets[::-1]):
                t = _clock()
                evaluate(bud)
                best[bud] = min(best[bud], _clock() - t)
            if r >= 1 and _clock() - start > BUDGET_S:
                break
        return {"eval_bytes": min(budgets, key=lambda bud: best[bud]),
                "eval_ms": {str(bud): round(best[bud] * 1e3, 4) for bud in budgets}}

    key = eval_key(b, rows)
    hit, cached = _cached(key, lambda e: isinstance(e.get("eval_bytes"), int) and e["eval_bytes"] > 0, measured)
    log.info("population bucket w<=%s x%d: evaluation chunks of %d KiB, %s on %s%s", b.net.width,
             len(b.members), hit["eval_bytes"] >> 10, "cached" if cached else "measured", cpu_model(),
             f" ({', '.join(f'{int(k) >> 10} KiB {v:.3g} ms' for k, v in hit['eval_ms'].items())})"
             if "eval_ms" in hit else "")
    return hit["eval_bytes"]


def record(choice: Choice) -> Dict:
    """The choice as metrics.json keeps it (``population_tuning``); a CNN bucket's names its
    two forms."""
    out = {k: v for k, v in asdict(choice).items() if v is not None and v != "" and k != "forms"}
    if choice.forms != Choice.forms:
        out["forms"] = list(choice.forms)
    return out


__all__: List[str] = ["Choice", "cache_path", "cached_choice", "checked_loop_width", "choose_eval_budget",
                      "choose_form", "choose_loop", "cpu_model", "faster_is_loop", "machine_key", "record",
                      "time_forms"]
