"""Speed of regexp against plain PyTorch, measured side by side in one process.

Default mode (one model): a plain PyTorch loop (DataLoader, per-step ``loss.item()`` and
TensorBoard scalar) against ``regexp.train.trainer.train`` on the same workload: MLP
40-100-100-10 on MNIST-1D, batch 100, Adam, the same number of steps and a per-epoch
evaluation of train/val/test in both. The two alternate for ``--repeats`` rounds; the
script prints each one's steps/s (median) and the ratio regexp / plain.

``--sweep`` (a width × seed sweep): the same workload three ways, alternating:
  A: plain PyTorch, one model at a time, DataLoader, per-step logging;
  B: regexp, one member at a time (``sweep.engine=serial``);
  C: regexp population (``sweep.engine=population``);
  D: the PyTorch ensembling recipe (``torch.func.stack_module_state`` + ``functional_call`` +
     ``vmap``): the seeds of one width trained together as one vmapped model, fused optimizer,
     losses read once per epoch, the per-epoch evaluation vmapped too.
``--model cnn`` / ``--model transformer`` sweep ``model.channels`` ([k, 2k], ``model=cnn``'s
layout) / ``model.embed_dim`` (``model=transformer``) instead of the MLP's width; A and D then
train the same network written with torch.nn here (``plain_cnn``, ``PlainTransformer``).
It prints wall times, the ratios A/C, B/C and D/C, C's achieved GFLOP/s (useful work: unpadded
training and evaluation FLOPs) and that as a fraction of this machine's float32 matmul
throughput, measured here with the same thread count; also the CPU model and how C computed
each bucket (batched or member by member, and whether measured, cached or set by
``--set +extra.population.loop_width=N``), chosen in an untimed first epoch of C.

    python scripts/bench.py [--epochs 20] [--repeats 3]
    python scripts/bench.py --sweep [--epochs 3] [--widths 4,8,...] [--seeds 3] [--depth 1]
                            [--optimizer sgd|momentum|adam] [--eval-every 1] [--model mlp|cnn|transformer]

``--thread-scaling`` (the ``trainer.threads=auto`` threshold): training steps (forward,
backward, fused Adam) of MLPs of several widths/depths and the default CNN and transformer on
MNIST-1D-shaped inputs (1, 40), 10 classes, batch 32..1000, with 1 and 2 threads alternating
in one process. It prints FLOPs per step (``regexp.train.threads.step_flops``), median ms/step
at 1 and 2 threads, the ratio, the cores other processes kept busy meanwhile, and the
crossover FLOP count above which 2 threads are >= 1.2x faster.

    python scripts/bench.py --thread-scaling [--repeats 5] [--batches 32,100,300,1000] [--wait-idle 20]

``--manual`` (does the hand-written backward earn its keep? The issue's bar: >= 1.3x):
``StackedMLP.manual_step`` against the autograd step the engine takes otherwise (forward,
``nll_rows`` loss, ``backward``), with the same stacked optimizer update, alternating:
per training step, for buckets of ``--seeds`` members of each width (batch 100, the batched
form below ``Options.loop_width``, the member-by-member form from it on); then end to end, the
``--sweep`` workload's population (C) with and without it (``engine._manual_ok`` turned off).

    python scripts/bench.py --manual [--widths 4,30,241,1024] [--seeds 3] [--depth 1] [--epochs 3]

``--probes``: the default run (MLP 40-100-100-10, MNIST-1D, Adam, 20 epochs) without
probes, with each listed probe alone and (when more than one is listed) with all of them, at
their defaults (or ``--set`` overrides), alternating; prints the median wall and CPU time of
each and its ratio to the run without probes (a probe's budget: at most 1.2x).

    python scripts/bench.py --probes [hessian,sharpness] [--set probe.every=5] [--repeats 3] [--members 0,5]

``--members`` lists the sizes compared side by side, all in each round: 0 the lone run, M a
population of M seeds of it (``train_population``), whose probes are measured batched across
the members. The clock covers the run (``train`` / ``train_population``), not composing its
config.

Use ``--threads`` (default 1) for all contenders alike; timings on a shared machine vary, so
the ratio of interleaved runs is the figure to read, not an absolute time.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SWEEP_WIDTHS = [4, 6, 11, 18, 30, 50, 85, 143, 241, 406, 683, 1024]  # 12 widths, ~geometric


# ---------------------------------------------------------------- configs
def cpu_time() -> float:
    """CPU seconds of this process and of its finished children: a population's worker
    processes (``extra.population.workers``) do its work outside this process."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def compose(overrides: Sequence[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from regexp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# ---------------------------------------------------------------- A: plain PyTorch
def plain_mlp(width: int, depth: int) -> nn.Module:
    layers: List[nn.Module] = [nn.Flatten()]
    d = 40
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


def plain_cnn(channels: Sequence[int]) -> nn.Module:
    """``model=cnn``'s default layout: per stage Conv1d (kernel 5, same padding), ReLU,
    MaxPool1d(2); then global average pooling and a linear head."""
    layers: List[nn.Module] = []
    c_in = 1
    for c in channels:
        layers += [nn.Conv1d(c_in, c, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c_in, 10))


class PlainTransformer(nn.Module):
    """``model=transformer`` on MNIST-1D written with torch.nn: 40 / patch tokens of ``patch``
    values, learned positions, pre-norm ``nn.TransformerEncoderLayer``s, a final norm, the mean
    over tokens, a linear head."""

    def __init__(self, embed_dim: int, depth: int, heads: int, mlp_ratio: float, patch: int):
        super().__init__()
        self.patch = patch
        self.pos = nn.Parameter(torch.randn(1, 40 // patch, embed_dim) * 0.02)
        self.embed = nn.Linear(patch, embed_dim)
        layer = nn.TransformerEncoderLayer(embed_dim, heads, int(embed_dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.pos
        return self.head(self.norm(self.encoder(h)).mean(1))


# --sweep --model: the swept key, its default values (--widths) and default overrides (a key
# also given by --set takes --set's value), per model
SWEEPS = {
    "mlp": ("model.width", SWEEP_WIDTHS, []),
    # model=cnn's two stages [16, 32] scaled: [k, 2k]; --widths gives k
    "cnn": ("model.channels", [2, 4, 8, 16, 32], []),
    # multiples of model.heads (4); 40 tokens make an example ~40x an MLP's work: fewer of them
    # keep the four arms within a minute or two on a loaded 2-core CPU
    "transformer": ("model.embed_dim", [4, 8, 16], ["data.n_train=1000", "data.n_test=500"]),
}
CNN_DEFAULTS = {"kernel_size": 5, "stride": 1, "padding": None, "pool": "max", "norm": "none",
                "head": "gap", "activation": "relu"}  # the layout plain_cnn writes out


def sweep_value(model: str, w: int):
    """A swept point's value of the model's key for width argument ``w``."""
    return [w, 2 * w] if model == "cnn" else w


def plain_builder(mcfg, value) -> Callable[[], nn.Module]:
    """Arm A's and D's model for one swept value, the same function and FLOPs as regexp's."""
    if mcfg.name == "cnn":
        for key, want in CNN_DEFAULTS.items():
            if mcfg[key] != want:
                raise SystemExit(f"bench --sweep --model cnn: model.{key}={mcfg[key]} is not supported "
                                 f"(arms A and D write out model=cnn's default layout: model.{key}={want})")
        return lambda: plain_cnn(value)
    if mcfg.name == "transformer":
        patch = mcfg.patch_size or 1
        if 40 % patch:
            raise SystemExit(f"bench --sweep --model transformer: model.patch_size={patch} must divide 40")
        return lambda: PlainTransformer(value, mcfg.depth, mcfg.heads, mcfg.mlp_ratio, patch)
    return lambda: plain_mlp(value, mcfg.depth)


def model_flops(cfg, value, n_train: int, n_eval: int, epochs: int, evals: int) -> float:
    """Useful float ops of one CNN or Transformer run: 2·MAC a forward example, three times that
    a training one (forward, input and weight gradients), multiply-adds from compat's cost."""
    from regexp.population.compat import member_cost

    macs = member_cost(cfg, (1, 40), 10)(tuple(value) if isinstance(value, list) else value)
    return 2 * macs * (3 * n_train * epochs + n_eval * evals)


def plain_train(data, net: Callable[[], nn.Module], epochs: int, batch: int, opt_name: str, lr: float,
                seed: int, log_dir: Path, device: str = "cpu", eval_every: int = 1) -> int:
    """A textbook loop: DataLoader, per-step loss.item() + TensorBoard, per-epoch evaluation;
    ``net`` builds the model (after ``torch.manual_seed(seed)``)."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(seed)
    model = net().to(device)
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if opt_name == "momentum" else 0.0))
    loader = DataLoader(TensorDataset(data.x_train.to(device), data.y_train.to(device)), batch_size=batch,
                        shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    writer = SummaryWriter(str(log_dir))
    step = 0
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            writer.add_scalar("loss/train_step", loss.item(), step)
            step += 1
        if (epoch + 1) % eval_every and epoch + 1 != epochs:
            continue
        model.eval()
        with torch.no_grad():
            for split in ("train", "val", "test"):
                x, y = (t.to(device) for t in data.split(split))
                logits = model(x)
                writer.add_scalar(f"loss/{split}", F.cross_entropy(logits, y).item(), epoch)
                writer.add_scalar(f"acc/{split}", (logits.argmax(1) == y).float().mean().item(), epoch)
    writer.close()
    return step


# ---------------------------------------------------------------- D: the PyTorch ensembling recipe
def ensemble_train(datas, net: Callable[[], nn.Module], epochs: int, batch: int, opt_name: str, lr: float,
                   seeds: Sequence[int], log_dir: Path, device: str = "cpu", eval_every: int = 1) -> int:
    """The seeds of one width as one ensemble (PyTorch's model-ensembling tutorial, trained):
    stacked parameters, ``vmap`` over ``functional_call``, one optimizer over the stacked
    tensors (elementwise, so each member's update is its own), each member on its own split in
    its own order; losses stay on the device and are read and logged once per epoch."""
    import copy
    import warnings

    from torch.func import functional_call, stack_module_state
    from torch.utils.tensorboard import SummaryWriter

    # vmap has no batching rule for the CPU attention kernel and loops over the members there;
    # that loop is part of what the recipe costs a Transformer: measured, not warned about
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")

    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(net().to(device))
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    fwd = torch.vmap(lambda p, b, x: functional_call(skeleton, (p, b), (x,)))
    tensors = list(params.values())
    opt = (torch.optim.Adam(tensors, lr=lr, fused=True) if opt_name == "adam"
           else torch.optim.SGD(tensors, lr=lr, momentum=0.9 if opt_name == "momentum" else 0.0, fused=True))
    xs = torch.stack([d.x_train for d in datas]).to(device)
    ys = torch.stack([d.y_train for d in datas]).to(device)
    splits = {s: [torch.stack(t).to(device) for t in zip(*(d.split(s) for d in datas))]
              for s in ("train", "val", "test")}
    m, n = ys.shape
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    writers = [SummaryWriter(str(log_dir / str(s))) for s in seeds]
    rows = torch.arange(m, device=device)[:, None]
    step = 0
    for epoch in range(epochs):
        perm = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        xe, ye = xs[rows, perm], ys[rows, perm]
        running = torch.zeros(m, device=device)
        for i in range(0, n, batch):
            xb, yb = xe[:, i:i + batch], ye[:, i:i + batch]
            logits = fwd(params, buffers, xb)
            loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(m, -1).mean(1)
            opt.zero_grad()
            loss.sum().backward()  # members are independent: each gets its own gradient
            opt.step()
            running += loss.detach() * yb.shape[1]
            step += 1
        logs = [{"loss/train_running": v} for v in (running / n).tolist()]
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            with torch.no_grad():
                for split, (x, y) in splits.items():
                    logits = fwd(params, buffers, x)
                    ls = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(m, -1).mean(1)
                    acc = (logits.argmax(2) == y).float().mean(1)
                    for row, l, a in zip(logs, ls.tolist(), acc.tolist()):
                        row[f"loss/{split}"], row[f"acc/{split}"] = l, a
        for w, row in zip(writers, logs):
            for tag, v in row.items():
                w.add_scalar(tag, v, epoch)
    for w in writers:
        w.close()
    return step


# ---------------------------------------------------------------- FLOPs and the matmul roof
def mlp_flops(width: int, depth: int, n_train: int, n_eval: int, epochs: int) -> float:
    """Useful float ops: forward 2·MAC, weight grads 2·MAC, input grads 2·MAC except layer 1."""
    dims = [40] + [width] * depth + [10]
    macs = [a * b for a, b in zip(dims[:-1], dims[1:])]
    train = n_train * (6 * sum(macs) - 2 * macs[0])
    return epochs * (train + n_eval * 2 * sum(macs))


def matmul_gflops(threads: int, per_cpu_second: bool = False) -> float:
    """Best float32 GEMM rate over a few square sizes, with ``threads`` threads: per wall
    second, or per second of this process's CPU time (on a loaded machine the wall rate
    counts the time other processes held the core; the CPU rate does not)."""
    torch.set_num_threads(threads)
    clock = time.process_time if per_cpu_second else time.perf_counter
    best = 0.0
    for n in (256, 512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        reps = max(3, int(2e9 / (2 * n ** 3)))
        t = clock()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / max(clock() - t, 1e-9) / 1e9)
    return best


# ---------------------------------------------------------------- the two modes
def single(args) -> None:
    from regexp.data import load_data
    from regexp.train.trainer import train

    base = ["model.width=100", "model.depth=2", "optimizer=adam", f"trainer.epochs={args.epochs}",
            "trainer.batch_size=100", "trainer.progress=false", f"trainer.threads={args.threads}"]
    cfg = compose(base)
    data = load_data(cfg.data, 0)
    steps = args.epochs * math.ceil(len(data.y_train) / 100)
    rates: Dict[str, List[float]] = {"plain": [], "regexp": []}
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up, not timed: first imports (torch.optim pulls in dynamo), allocator, caches
        plain_train(data, lambda: plain_mlp(100, 2), 1, 100, "adam", 1e-3, 0, Path(tmp) / "warm_plain")
        train(compose(base + ["trainer.epochs=1"]), Path(tmp) / "warm_regexp", [])
        for r in range(args.repeats):
            torch.set_num_threads(args.threads)
            t = time.perf_counter()
            n = plain_train(data, lambda: plain_mlp(100, 2), args.epochs, 100, "adam", 1e-3, 0,
                            Path(tmp) / f"plain{r}")
            rates["plain"].append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            train(cfg, Path(tmp) / f"regexp{r}", [])
            rates["regexp"].append(steps / (time.perf_counter() - t))
    p, q = statistics.median(rates["plain"]), statistics.median(rates["regexp"])
    print(f"workload: MLP 40-100-100-10, MNIST-1D, batch 100, Adam, {steps} steps, "
          f"{args.threads} thread(s), {args.repeats} alternating repeats")
    print(f"plain PyTorch (DataLoader): {p:8.1f} steps/s   {[round(v) for v in rates['plain']]}")
    print(f"regexp trainer:             {q:8.1f} steps/s   {[round(v) for v in rates['regexp']]}")
    print(f"ratio regexp / plain: {q / p:.2f}x (target >= 1.5x)")


def cpu_model() -> str:
    """lscpu's model name (README figures name the CPU they were measured on)."""
    import subprocess

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")


def probes(args) -> None:
    """The default run (MLP on MNIST-1D, Adam, 20 epochs) with and without probes, alternating,
    for each size in ``--members``: 0 the lone run, M a population of M seeds of it. Every
    round runs all contenders one after the other, so the ratios share the machine's load."""
    import os

    from regexp.population import train_population
    from regexp.train.trainer import train

    def run(members: int, cfg, out: Path) -> None:
        if members:
            train_population(cfg, [{"seed": s} for s in range(members)], out)
        else:
            train(cfg, out, [])

    sizes = [int(m) for m in str(args.members).split(",")]
    base = ["trainer.progress=false", f"trainer.threads={args.threads}", f"trainer.epochs={args.epochs}"]
    names = args.probes.split(",")
    arms = {"no probes": base, **{n: base + [f"probe=[{n}]", *args.set] for n in names}}
    if len(names) > 1:
        arms[args.probes] = base + [f"probe=[{args.probes}]", *args.set]
    contenders = [(m, name) for m in sizes for name in arms]
    # composed before the clock starts: the timing is the run itself, what the probes change
    cfgs = {name: compose(over) for name, over in arms.items()}
    wall: Dict[tuple, List[float]] = {k: [] for k in contenders}
    cpu: Dict[tuple, List[float]] = {k: [] for k in contenders}
    print(f"CPU: {cpu_model()}; load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for m, name in contenders:  # warm-up, not timed (imports, caches)
            run(m, compose(arms[name] + ["trainer.epochs=1"]), Path(tmp) / f"warm {m} {name}")
        for r in range(args.repeats):
            for m, name in contenders:
                torch.set_num_threads(args.threads)
                t, c = time.perf_counter(), cpu_time()
                run(m, cfgs[name], Path(tmp) / f"{m} {name} {r}")
                wall[(m, name)].append(time.perf_counter() - t)
                cpu[(m, name)].append(cpu_time() - c)
    print(f"workload: MLP 40-100-100-10, MNIST-1D, batch 100, Adam, {args.epochs} epochs, "
          f"probe=[{args.probes}] {' '.join(args.set)} (defaults otherwise), {args.threads} thread(s), "
          f"{args.repeats} alternating repeats (medians); load average at the end "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for m in sizes:
        who = f"population of {m} seeds" if m else "lone run"
        med = {name: (statistics.median(wall[(m, name)]), statistics.median(cpu[(m, name)])) for name in arms}
        for name, (w, c) in med.items():
            print(f"{who:22s} {name:18s} wall {w:6.2f} s  cpu {c:6.2f} s   "
                  f"cpus {[round(v, 2) for v in cpu[(m, name)]]}")
        w0, c0 = med["no probes"]
        for name in list(arms)[1:]:
            (w1, c1), goal = med[name], " (target <= 1.20x)" if "," not in name else ""
            print(f"{who:22s} ratio {name} / no probes: wall {w1 / w0:.2f}x, cpu {c1 / c0:.2f}x{goal}")


def sweep(args) -> None:
    import os

    from regexp.data import load_data
    from regexp.population.tuning import cpu_model
    from regexp.sweep import grid, run_points

    swept, default_widths, defaults = SWEEPS[args.model]
    given = {o.split("=", 1)[0].lstrip("+~") for o in args.set}
    defaults = [o for o in defaults if o.split("=", 1)[0] not in given]  # every arm's data
    widths = [int(w) for w in args.widths.split(",")] if args.widths else default_widths
    values = [sweep_value(args.model, w) for w in widths]
    seeds = list(range(args.seeds))
    # the MLP's depth is --depth; the CNN and Transformer keep their config's layout
    layout = [f"model.depth={args.depth}"] if args.model == "mlp" else [f"model={args.model}"]
    base = [*layout, f"optimizer={args.optimizer}", f"trainer.epochs={args.epochs}",
            "trainer.batch_size=100", "trainer.progress=false", f"trainer.threads={args.threads}",
            "trainer.device=" + args.device, f"trainer.eval_every={args.eval_every}", *defaults, *args.set]
    # C on one process like the others (its worker processes would add a core the other arms
    # lack): --set extra.population.workers=auto to measure them
    if "extra.population.workers" not in given:
        base.append("++extra.population.workers=1")
    cfg = {e: compose(base + [f"sweep.engine={e}"]) for e in ("serial", "population")}
    points = grid({swept: values}, seeds)
    lr = float(cfg["serial"].optimizer.lr)
    data = {s: load_data(cfg["serial"].data, s) for s in seeds}
    n_train = len(data[0].y_train)
    n_eval = sum(len(data[0].split(s)[1]) for s in ("train", "val", "test"))
    evals = len([e for e in range(1, args.epochs + 1) if e % args.eval_every == 0 or e == args.epochs])
    if args.model == "mlp":
        flops = sum(mlp_flops(w, args.depth, n_train, 0, args.epochs) + mlp_flops(w, args.depth, 0, n_eval, evals)
                    for w in widths) * len(seeds)
    else:
        flops = sum(model_flops(cfg["serial"], v, n_train, n_eval, args.epochs, evals) for v in values) * len(seeds)
    net = {str(v): plain_builder(cfg["serial"].model, v) for v in values}
    roof = matmul_gflops(args.threads)
    roof_cpu = matmul_gflops(args.threads, per_cpu_second=True)
    times: Dict[str, List[float]] = {"A": [], "B": [], "C": [], "D": []}
    cpu: Dict[str, List[float]] = {"A": [], "B": [], "C": [], "D": []}
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up, not timed: first imports (torch.optim pulls in dynamo), allocator, caches
        warm = [{swept: values[0], "seed": 0}]
        plain_train(data[0], net[str(values[0])], 1, 100, args.optimizer, lr, 0, Path(tmp) / "wA", args.device)
        ensemble_train([data[s] for s in seeds], net[str(values[0])], 1, 100, args.optimizer, lr, seeds,
                       Path(tmp) / "wD", args.device)
        for engine in ("serial", "population"):
            run_points(compose(base + [f"sweep.engine={engine}", "trainer.epochs=1"]), warm,
                       Path(tmp) / f"w{engine}")
        # every bucket of B and C once, untimed: the first population on a machine measures
        # each bucket's form (regexp/population/tuning.py, cached), a one-time cost kept out of
        # both (B's populations of one have buckets of their own)
        run_points(compose(base + ["sweep.engine=serial", "trainer.epochs=1"]), points, Path(tmp) / "wB")
        t = time.perf_counter()
        run_points(compose(base + ["sweep.engine=population", "trainer.epochs=1"]), points, Path(tmp) / "wC")
        warm_c = time.perf_counter() - t
        for r in range(args.repeats):
            torch.set_num_threads(args.threads)
            t, c0 = time.perf_counter(), cpu_time()
            for p in points:
                d = load_data(cfg["serial"].data, p["seed"])
                plain_train(d, net[str(p[swept])], args.epochs, 100, args.optimizer, lr,
                            p["seed"], Path(tmp) / f"A{r}" / str(p), args.device, args.eval_every)
            times["A"].append(time.perf_counter() - t)
            cpu["A"].append(cpu_time() - c0)
            for key, engine in (("B", "serial"), ("C", "population")):
                t, c0 = time.perf_counter(), cpu_time()
                rows = run_points(cfg[engine], points, Path(tmp) / f"{key}{r}")
                times[key].append(time.perf_counter() - t)
                cpu[key].append(cpu_time() - c0)
                assert all(row["status"] == "completed" for row in rows), rows
            torch.set_num_threads(args.threads)
            t, c0 = time.perf_counter(), cpu_time()
            for v in values:
                ensemble_train([load_data(cfg["serial"].data, s) for s in seeds], net[str(v)], args.epochs,
                               100, args.optimizer, lr, seeds, Path(tmp) / f"D{r}" / str(v), args.device,
                               args.eval_every)
            times["D"].append(time.perf_counter() - t)
            cpu["D"].append(cpu_time() - c0)
            print(f"round {r + 1}: wall A {times['A'][-1]:.2f}s B {times['B'][-1]:.2f}s C {times['C'][-1]:.2f}s"
                  f" D {times['D'][-1]:.2f}s | cpu A {cpu['A'][-1]:.2f}s B {cpu['B'][-1]:.2f}s"
                  f" C {cpu['C'][-1]:.2f}s D {cpu['D'][-1]:.2f}s", flush=True)
        forms = bucket_forms(Path(tmp) / "wC", points)
    a, b, c, d = (statistics.median(times[k]) for k in "ABCD")
    ca, cb, cc, cd = (statistics.median(cpu[k]) for k in "ABCD")
    m = cfg["serial"].model
    what = {"mlp": f"MLP depth {args.depth}, widths {widths}",
            "cnn": f"CNN (model=cnn: kernel 5, max pool, GAP), channels [k, 2k] for k in {widths}",
            "transformer": f"Transformer (depth {m.get('depth')}, {m.get('heads')} heads, mlp_ratio "
                           f"{m.get('mlp_ratio')}, patch {m.get('patch_size') or 1}), embed_dim {widths}"}
    print(f"workload: MNIST-1D{' (' + ' '.join(defaults) + ')' if defaults else ''}, {what[args.model]} "
          f"x {len(seeds)} seeds "
          f"{'(B, C: ' + ' '.join(args.set) + ') ' if args.set else ''}"
          f"({len(points)} models), {args.epochs} epochs, batch 100, {args.optimizer}, "
          f"eval every {args.eval_every}, {args.threads} thread(s), device {args.device}, "
          f"{args.repeats} alternating repeats (medians)")
    print(f"CPU: {cpu_model()}, torch {torch.__version__}; load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (1, 5, 15 min, at the end)")
    print(f"C's buckets, as its untimed first epoch chose them ({warm_c:.2f} s, measuring included): {forms}")
    print("                                   wall      process CPU (robust to other load)")
    print(f"A plain PyTorch, one at a time:  {a:8.2f} s  {ca:8.2f} s")
    print(f"B regexp, one member at a time:  {b:8.2f} s  {cb:8.2f} s")
    print(f"C regexp population:             {c:8.2f} s  {cc:8.2f} s")
    print(f"D torch.func ensemble per width: {d:8.2f} s  {cd:8.2f} s")
    if args.model == "mlp":
        print(f"wall: A/C = {a / c:.2f}x (target >= 5 on CPU)   B/C = {b / c:.2f}x   D/C = {d / c:.2f}x (target >= 2.5)")
    else:
        print(f"wall: A/C = {a / c:.2f}x   B/C = {b / c:.2f}x (target >= 3)   D/C = {d / c:.2f}x (target >= 2)")
    print(f"cpu:  A/C = {ca / cc:.2f}x   B/C = {cb / cc:.2f}x   D/C = {cd / cc:.2f}x")
    print(f"useful work {flops / 1e9:.1f} GFLOP; C achieves {flops / c / 1e9:.1f} GFLOP/s = "
          f"{flops / c / 1e9 / roof:.0%} of the measured matmul throughput {roof:.1f} GFLOP/s "
          f"(target >= 30%); A achieves {flops / a / 1e9:.1f} GFLOP/s")
    print(f"per CPU second: C {flops / cc / 1e9:.1f} GFLOP/s = {flops / cc / 1e9 / roof_cpu:.0%} of the matmul "
          f"throughput per CPU second {roof_cpu:.1f} GFLOP/s, "
          f"A {flops / ca / 1e9:.1f} GFLOP/s")


def bucket_forms(sweep_dir: Path, points) -> str:
    """How C computed its buckets, from its members' metrics.json (``population_tuning``):
    the padded width, members, form and where the choice came from."""
    import json

    from regexp.sweep import point_name

    seen: Dict[str, Dict] = {}
    for p in points:
        t = json.loads((sweep_dir / point_name(p) / "metrics.json").read_text()).get("population_tuning", {})
        seen.setdefault(t.get("key", t.get("source", "?")), t)
    out = []
    for key, t in seen.items():
        pad = key.split(" pad")[1].split(" head")[0].split(" batch")[0] if " pad" in key else "?"
        ms = f" {t['batched_ms']:.3g}/{t['loop_ms']:.3g} ms" if "batched_ms" in t else ""
        forms = t.get("forms", ["batched", "loop"])  # a CNN bucket's: grouped convolutions / GEMM form
        out.append(f"w<={pad} {forms[1] if t.get('loop') else forms[0]} ({t.get('source')}{ms})")
    return "; ".join(out)


BUSY = 0.3  # cores kept busy by other processes beyond which a row's 2-thread time is unreliable


class OthersLoad:
    """Cores other processes kept busy between two calls (/proc/stat less this process's ticks)."""

    def __init__(self) -> None:
        from regexp.train import threads

        self.t, self.cpus = threads, threads._allowed_cpus()
        self.start = self._read()

    def _read(self):
        try:
            return (*self.t._cpu_ticks(self.cpus), self.t._own_ticks())
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> float:
        end = self._read()
        if self.start is None or end is None or end[1] <= self.start[1]:
            return float("nan")
        (b0, t0, o0), (b1, t1, o1) = self.start, end
        return len(self.cpus) * max(0, (b1 - b0) - (o1 - o0)) / (t1 - t0)


def thread_models():
    """(label, model config) pairs: MLPs from tiny to wide, and the default CNN and transformer."""
    from omegaconf import OmegaConf

    out = []
    mlp = compose(["model=mlp"]).model
    for width, depth in ((32, 1), (100, 1), (100, 2), (256, 2), (512, 2), (1024, 2), (1024, 4), (2048, 2)):
        c = OmegaConf.merge(mlp, {"width": width, "depth": depth})
        out.append((f"mlp {width}x{depth}", c))
    for name in ("cnn", "transformer"):
        out.append((f"{name} (default)", compose([f"model={name}"]).model))
    return out


def time_steps(step, n: int, clock=time.perf_counter) -> float:
    t = clock()
    for _ in range(n):
        step()
    return (clock() - t) / n


def thread_scaling(args) -> None:
    import os

    from regexp.models import build_model
    from regexp.train.threads import idle_cores, step_flops

    batches = [int(b) for b in args.batches.split(",")]
    print(f"CPU: {cpu_model()}; {len(os.sched_getaffinity(0))} cores allowed; torch {torch.__version__}; "
          f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'model':<20}{'batch':>6}{'MFLOP/step':>12}{'ms 1 thr':>10}{'ms 2 thr':>10}{'1/2':>7}"
          f"{'others':>8}{'idle':>6}")
    rows = []
    for label, mcfg in thread_models():
        for bs in batches:
            torch.manual_seed(0)
            model = build_model(mcfg, (1, 40), 10)
            flops = step_flops(model, (1, 40), bs)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as optimizer=adam
            x, y = torch.randn(bs, 1, 40), torch.randint(0, 10, (bs,))

            def step():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

            n = 0
            for th in (1, 2):  # warm-up both pools; size a timed block to ~30 ms at 1 thread
                torch.set_num_threads(th)
                per = time_steps(step, 3)
                n = n or max(3, min(200, int(0.03 / per)))
            best = None
            for _ in range(3):  # up to 3 tries: keep the one other processes disturbed least
                deadline = time.time() + args.wait_idle  # wait (bounded) for a quiet moment
                while (idle := idle_cores()) < len(os.sched_getaffinity(0)) and time.time() < deadline:
                    time.sleep(1.0)
                times: Dict[int, List[float]] = {1: [], 2: []}
                load = OthersLoad()
                for r in range(args.repeats):  # alternate the order so that drifts cancel
                    for th in ((1, 2) if r % 2 == 0 else (2, 1)):
                        torch.set_num_threads(th)
                        times[th].append(time_steps(step, n))
                others = load.cores()
                if best is None or others < best[0]:
                    best = (others, idle, *(statistics.median(times[th]) * 1e3 for th in (1, 2)))
                if others <= BUSY:
                    break
            others, idle, t1, t2 = best
            rows.append((flops, t1 / t2, others <= BUSY))
            print(f"{label:<20}{bs:>6}{flops / 1e6:>12.1f}{t1:>10.3f}{t2:>10.3f}{t1 / t2:>7.2f}"
                  f"{others:>8.2f}{idle:>6}{'' if others <= BUSY else '  * disturbed'}", flush=True)
    torch.set_num_threads(args.threads)
    clean = sorted((f, r) for f, r, ok in rows if ok)
    below = [f for f, r in clean if r < 1.2]
    print(f"{args.repeats} alternating repeats per row, medians; 'others': cores other processes kept "
          f"busy meanwhile (rows over {BUSY} are marked and left out below); 'idle': idle_cores()")
    first = next((f for f, r in clean if r >= 1.2), None)
    above = [f for f, _ in clean if below and f > max(below)]
    print(f"first row with 2 threads >= 1.2x faster: {first / 1e6:.1f} MFLOP/step" if first else
          "2 threads never >= 1.2x faster")
    print(f"crossover: every row above {max(below) / 1e6:.1f} MFLOP/step is >= 1.2x faster with 2 threads "
          f"(next row {min(above) / 1e6:.1f} MFLOP)" if below and above else
          f"crossover: none in range ({len(below)} of {len(clean)} rows < 1.2x)")
    print(f"2 threads slower than 1 up to {max(f for f, r in clean if r < 1) / 1e6:.1f} MFLOP/step"
          if any(r < 1 for _, r in clean) else "2 threads never slower than 1")


def manual(args) -> None:
    """StackedMLP.manual_step against autograd: per training step, then the sweep end to end."""
    import os

    from regexp.population import engine
    from regexp.population.optim import StackedOptimizer
    from regexp.population.stacked_mlp import StackedMLP
    from regexp.sweep import grid, run_points

    widths = [int(w) for w in args.widths.split(",")] if args.widths else SWEEP_WIDTHS
    m, bs = args.seeds, 100
    hp = {"lr": [0.01] * m, "momentum": [0.9 if args.optimizer == "momentum" else 0.0] * m, "dampening": [0.0] * m}
    if args.optimizer == "adam":
        hp = {"lr": [1e-3] * m, "beta1": [0.9] * m, "beta2": [0.999] * m, "eps": [1e-8] * m, "weight_decay": [0.0] * m}
    print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.threads} thread(s); "
          f"{args.repeats} alternating repeats (medians)", flush=True)
    print("per step, process CPU time (robust to other processes' load):")
    print(f"{'width':>6}{'form':>8}{'ms manual':>11}{'ms autograd':>13}{'autograd/manual':>17}")
    lw = engine.Options().loop_width  # a width, or None / "auto" (chosen per machine): then 256 here
    for w in widths:
        torch.manual_seed(0)
        loop = 0 < lw <= w if isinstance(lw, int) else w >= 256
        net = StackedMLP([plain_mlp(w, args.depth)[1:] for _ in range(m)], [w] * m, w, "relu",
                         torch.device("cpu"), loop=loop)
        opt = StackedOptimizer(args.optimizer if args.optimizer != "momentum" else "sgd", net.params, hp,
                               False, torch.device("cpu"))
        x, y = torch.randn(m, bs, 40), torch.randint(0, 10, (m, bs))

        def by_hand():
            net.manual_step(x, y)
            opt.step(1.0)

        def by_autograd():  # the engine's step without manual_step (_train_epoch's backward)
            logits = net.forward(x)
            loss = engine.nll_rows(logits.reshape(m * bs, 10), y.reshape(-1)).view(m, bs).mean(1)
            for p in net.params:
                p.grad = None
            loss.sum().backward()
            opt.step(1.0)

        n = max(3, min(200, int(0.1 / time_steps(by_autograd, 3))))  # ~100 ms blocks
        time_steps(by_hand, 3)
        times: Dict[str, List[float]] = {"manual": [], "autograd": []}
        for r in range(args.repeats):
            for name, step in ((("manual", by_hand), ("autograd", by_autograd)) if r % 2 == 0
                               else (("autograd", by_autograd), ("manual", by_hand))):
                times[name].append(time_steps(step, n, time.process_time))
        tm, ta = (statistics.median(times[k]) * 1e3 for k in ("manual", "autograd"))
        print(f"{w:>6}{'loop' if net.loop else 'batched':>8}{tm:>11.3f}{ta:>13.3f}{ta / tm:>17.2f}", flush=True)

    base = [f"model.depth={args.depth}", f"optimizer={args.optimizer}", f"trainer.epochs={args.epochs}",
            "trainer.batch_size=100", "trainer.progress=false", f"trainer.threads={args.threads}",
            "trainer.device=cpu", "sweep.engine=population", *args.set]
    cfg = compose(base)
    points = grid({"model.width": widths}, list(range(m)))
    chosen = engine._manual_ok
    arms = {"manual": chosen, "autograd": lambda b, opts: False}
    wall: Dict[str, List[float]] = {k: [] for k in arms}
    cpu: Dict[str, List[float]] = {k: [] for k in arms}  # robust to other processes' load
    with tempfile.TemporaryDirectory() as tmp:
        run_points(compose(base + ["trainer.epochs=1"]), points[:1], Path(tmp) / "warm")
        try:
            for r in range(args.repeats):
                for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                    engine._manual_ok = arms[name]
                    torch.set_num_threads(args.threads)
                    t, c = time.perf_counter(), cpu_time()
                    rows = run_points(cfg, points, Path(tmp) / f"{name}{r}")
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(cpu_time() - c)
                    assert all(row["status"] == "completed" for row in rows), rows
        finally:
            engine._manual_ok = chosen
    wm, wa = statistics.median(wall["manual"]), statistics.median(wall["autograd"])
    cm, ca = statistics.median(cpu["manual"]), statistics.median(cpu["autograd"])
    print(f"sweep end to end: widths {widths} x {m} seeds, depth {args.depth}, {args.optimizer}, {args.epochs} "
          f"epochs, batch 100: wall manual {wm:.2f} s, autograd {wa:.2f} s, autograd/manual {wa / wm:.2f}x; "
          f"process CPU manual {cm:.2f} s, autograd {ca:.2f} s, autograd/manual {ca / cm:.2f}x "
          f"(keep manual_step if >= 1.3x); load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="the four-way sweep comparison (A, B, C, D)")
    ap.add_argument("--probes", nargs="?", const="hessian,sharpness", default=None, metavar="NAMES",
                    help="the default run with and without probes (default: hessian,sharpness)")
    ap.add_argument("--members", default="0,5",
                    help="probes: comma-separated sizes, 0 the lone run, M a population of M seeds (default 0,5)")
    ap.add_argument("--thread-scaling", action="store_true",
                    help="1 vs 2 threads per training step across model sizes (trainer.threads=auto)")
    ap.add_argument("--batches", default="32,100,300,1000", help="thread-scaling batch sizes")
    ap.add_argument("--wait-idle", type=float, default=20.0,
                    help="thread-scaling: seconds to wait for all cores idle before each row's try")
    ap.add_argument("--epochs", type=int, default=None, help="default: 20 (single), 3 (sweep)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="alternating rounds; default 3 (single), 2 (sweep), 5 (thread-scaling)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every contender")
    ap.add_argument("--widths", default="",
                    help="sweep widths, comma-separated (default: MLP 12 from 4 to 1024, CNN k = 2..32, "
                         "Transformer embed_dim 4, 8, 16)")
    ap.add_argument("--seeds", type=int, default=3, help="sweep seeds per width")
    ap.add_argument("--depth", type=int, default=1, help="sweep MLP hidden layers")
    ap.add_argument("--model", default="mlp", choices=tuple(SWEEPS),
                    help="sweep model: mlp (model.width), cnn (model.channels [k, 2k]), transformer "
                         "(model.embed_dim); --widths gives width, k or embed_dim")
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "momentum", "adam"), help="sweep optimizer")
    ap.add_argument("--eval-every", type=int, default=1, help="sweep: evaluate every this many epochs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="sweep: extra Hydra override for B and C (e.g. logger.histogram_every=0); "
                         "probes: for the run with probes")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="sweep device for B and C")
    ap.add_argument("--manual", action="store_true",
                    help="StackedMLP.manual_step against the autograd step: per step and the sweep end to end")
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (3 if args.sweep or args.manual else 20)
    args.repeats = args.repeats or (5 if args.thread_scaling else 2 if args.sweep else 3)
    torch.set_num_threads(args.threads)
    (thread_scaling if args.thread_scaling else sweep if args.sweep else manual if args.manual
     else probes if args.probes else single)(args)


if __name__ == "__main__":
    main()
