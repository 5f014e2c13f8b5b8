"""A population of one against plain PyTorch, and the hand-written backward against autograd.

The reference loop below is written from torch alone (``nn.Sequential``, ``nn.Conv1d``, a
pre-norm Transformer with its attention written out over ``nn.Linear`` and ``nn.LayerNorm``,
a bidirectional ``nn.GRU`` with a linear head, ``torch.optim``, ``torch.optim.lr_scheduler``, ``F.cross_entropy``); it shares with the population only what
fixes the starting point: the data set (``load_data``), the member's initial weights (its
``init_model.pt``) and its batch order (a ``Generator`` seeded with the run's seed drawing one
``randperm`` per epoch, as ``regexp/population/data.py`` documents it).

Stated tolerance: after 300 steps every parameter agrees within |a - b| <= 1e-5 + 1e-4·|b|
and every per-epoch loss within a relative 1e-5 (float32; measured at most 1.6e-6 absolute,
with Adagrad, and 2.5e-7 relative). The two compute the same function of the same numbers;
only the summation order inside the products differs (batched ``baddbmm`` / feature-major
GEMMs against ``nn.Linear``'s ``addmm``, a stacked update against torch's per-tensor loop).
The Transformer's weights agree as closely (measured at most 5.3e-6 absolute) but for its key
biases, which the softmax ignores: they are checked through the function they compute
(``_key_bias_rows``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import read_scalars
from regexp.data import load_data
from regexp.population import train_population
from regexp.population import engine
from regexp.population.engine import Options
from regexp.population.stacked_mlp import StackedMLP
from regexp.sweep import point_config, point_name

ATOL, RTOL = 1e-5, 1e-4  # weights after 300 steps (see the module docstring)
LOSS_RTOL = 1e-5
LOGIT_ATOL = 2e-5  # logits (up to ~6) with another key bias: rounding only (measured 3.3e-6)
N_TRAIN, BATCH, EPOCHS = 320, 32, 30  # 10 steps an epoch: 300 steps
BASE = [f"data.n_train={N_TRAIN}", f"trainer.batch_size={BATCH}", f"trainer.epochs={EPOCHS}",
        "trainer.progress=false", "trainer.threads=1", "trainer.device=cpu", "logger.histogram_every=0"]
MLP = ["model.width=24"]
ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


# ---------------------------------------------------------------- the plain-torch reference
def _plain_mlp(in_dim: int, classes: int, width: int, depth: int, act: str) -> nn.Sequential:
    layers: List[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), ACT[act]()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def _plain_cnn(m, input_shape, classes: int) -> nn.Sequential:
    """The 1-D CNN of ``model=cnn`` without pooling, flatten head (``model=cnn_mnist1d``)."""
    assert m.pool == "none" and m.head == "flatten" and m.norm == "none"
    n = len(m.channels)
    per_stage = lambda v: list(v) if OmegaConf.is_list(v) else [v] * n  # noqa: E731
    kernels, strides = per_stage(m.kernel_size), per_stage(m.stride)
    pads = [k // 2 for k in kernels] if m.padding is None else per_stage(m.padding)
    (c_in, length), layers = input_shape, []
    for c, k, s, p in zip(m.channels, kernels, strides, pads):
        layers += [nn.Conv1d(c_in, c, k, stride=s, padding=p), ACT[m.activation]()]
        c_in, length = c, (length + 2 * p - k) // s + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * length, classes))


class _PlainBlock(nn.Module):
    """One pre-norm encoder layer (Vaswani et al. 2017, with the norm first as in Xiong et al.
    2020), attention written out: its parameters are registered in nn.TransformerEncoderLayer's
    order, so the regexp model's initial weights copy across in order."""

    def __init__(self, e: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(e, 3 * e), nn.Linear(e, e)
        self.fc1, self.fc2 = nn.Linear(e, hidden), nn.Linear(hidden, e)
        self.norm1, self.norm2 = nn.LayerNorm(e), nn.LayerNorm(e)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        n, t, e = x.shape
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // self.heads), -1)
        return self.proj((w @ v).transpose(1, 2).reshape(n, t, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _PlainTransformer(nn.Module):
    """``model=transformer`` on a 1-D signal: tokens of ``patch`` values, a learned position
    embedding, pre-norm layers, a final norm, the mean over tokens, a linear head."""

    def __init__(self, m, input_shape, classes: int):
        super().__init__()
        c, length = input_shape
        self.patch = m.patch_size or 1
        n_tokens = -(-length // self.patch)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, m.embed_dim))
        self.embed = nn.Linear(c * self.patch, m.embed_dim)
        self.layers = nn.ModuleList([_PlainBlock(m.embed_dim, m.heads, int(m.embed_dim * m.mlp_ratio))
                                     for _ in range(m.depth)])
        self.norm = nn.LayerNorm(m.embed_dim)
        self.head = nn.Linear(m.embed_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, length = x.shape
        x = F.pad(x, (0, (-length) % self.patch))
        tok = x.view(n, c, -1, self.patch).permute(0, 2, 1, 3).flatten(2)  # (N, tokens, C·patch)
        h = self.embed(tok) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


class _PlainGRU(nn.Module):
    """``model=gru`` on a 1-D signal: ``nn.GRU`` over its positions, a linear head on every
    step's output (flatten) or on each direction's final state (last)."""

    def __init__(self, m, input_shape, classes: int):
        super().__init__()
        c, length = input_shape
        self.rnn = nn.GRU(c, m.hidden_size, m.layers, batch_first=True, bidirectional=m.bidirectional)
        self.flatten, self.directions = m.head == "flatten", 2 if m.bidirectional else 1
        self.head = nn.Linear(self.directions * m.hidden_size * (length if self.flatten else 1), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h_n = self.rnn(x.transpose(1, 2))
        return self.head(out.flatten(1) if self.flatten else torch.cat(list(h_n[-self.directions:]), 1))


def _plain_optimizer(cfg, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name in ("sgd", "momentum", "nesterov"):
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, dampening=o.dampening, nesterov=o.nesterov)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, alpha=o.alpha, eps=o.eps, momentum=o.momentum,
                                   centered=o.centered)
    if o.name == "adagrad":
        return torch.optim.Adagrad(params, lr=o.lr, eps=o.eps, initial_accumulator_value=o.initial_accumulator_value)
    if o.name == "adadelta":
        return torch.optim.Adadelta(params, lr=o.lr, rho=o.rho, eps=o.eps)
    raise AssertionError(o.name)


def _plain_scheduler(cfg, opt, total: int):
    s = cfg.scheduler
    if s.name == "constant":
        return None
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=s.min_lr_ratio * cfg.optimizer.lr)
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    raise AssertionError(s.name)


def reference_run(cfg, init: Dict[str, torch.Tensor]) -> Tuple[nn.Module, List[float], List[float]]:
    """Train cfg's MLP from ``init`` with plain torch; return the model, each epoch's running
    training loss (the mean of its batch losses, weighted by batch size) and each epoch's
    training-set loss after the epoch."""
    ds = load_data(cfg.data, cfg.seed)
    x, y = ds.split("train")
    m = cfg.model
    if m.name == "cnn":
        net = _plain_cnn(m, ds.input_shape, ds.num_classes)
    elif m.name == "transformer":
        net = _PlainTransformer(m, ds.input_shape, ds.num_classes)
    elif m.name == "gru":
        net = _PlainGRU(m, ds.input_shape, ds.num_classes)
    else:
        x = x.flatten(1)
        net = _plain_mlp(x.shape[1], ds.num_classes, m.width, m.depth, m.activation)
    assert [tuple(p.shape) for p in net.parameters()] == [tuple(t.shape) for t in init.values()]
    with torch.no_grad():
        for p, t in zip(net.parameters(), init.values()):
            p.copy_(t)
    regs = cfg.regularizer
    lam = float(regs.weight_decay.lam) if "weight_decay" in regs else 0.0
    eps = float(regs.label_smoothing.eps) if "label_smoothing" in regs else 0.0
    n, bs = len(y), int(cfg.trainer.batch_size)
    steps = -(-n // bs)
    opt = _plain_optimizer(cfg, net.parameters())
    sched = _plain_scheduler(cfg, opt, cfg.trainer.epochs * steps)
    order = torch.Generator().manual_seed(int(cfg.seed))
    running, train_loss = [], []
    for _ in range(cfg.trainer.epochs):
        perm = torch.randperm(n, generator=order)
        total = 0.0
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(net(x[idx]), y[idx], label_smoothing=eps)
            penalty = 0.5 * lam * sum(p.pow(2).sum() for p in net.parameters() if p.dim() >= 2)
            opt.zero_grad()
            (loss + penalty).backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(idx)
        running.append(total / n)
        with torch.no_grad():
            train_loss.append(F.cross_entropy(net(x), y).item())
    return net, running, train_loss


# ---------------------------------------------------------------- population of one = reference
def _watch_path(monkeypatch) -> Dict[str, list]:
    """The engine's choice of step (hand-written backward or autograd) and the hand-written
    steps taken (a start-up measurement of the step's form may add a few)."""
    seen: Dict[str, list] = {"manual_ok": [], "manual_steps": []}
    choose, step = engine._manual_ok, StackedMLP.manual_step

    def chosen(b, opts):
        seen["manual_ok"].append(choose(b, opts))
        return seen["manual_ok"][-1]

    def counted(self, *a, **kw):
        seen["manual_steps"].append(1)
        return step(self, *a, **kw)

    monkeypatch.setattr(engine, "_manual_ok", chosen)
    monkeypatch.setattr(StackedMLP, "manual_step", counted)
    return seen


def _assert_path(seen: Dict[str, list], manual: bool) -> None:
    assert seen["manual_ok"] == [manual]
    if manual:
        assert len(seen["manual_steps"]) >= EPOCHS * N_TRAIN // BATCH


CASES = {
    # relu with no penalty: the hand-written backward (StackedMLP.manual_step)
    "relu1-sgd": (["model.depth=1", "optimizer=sgd", "optimizer.lr=0.1"], True),
    "relu2-momentum-cosine": (["model.depth=2", "optimizer=momentum", "optimizer.lr=0.02", "scheduler=cosine"], True),
    "relu2-nesterov-step": (["model.depth=2", "optimizer=nesterov", "optimizer.lr=0.02", "scheduler=step",
                             "scheduler.step_size=100", "scheduler.gamma=0.5"], True),
    "relu2-adam": (["model.depth=2", "optimizer=adam", "optimizer.lr=0.003"], True),
    # autograd: tanh / gelu, or a penalty / label smoothing
    "tanh1-adam-smoothing": (["model.depth=1", "model.activation=tanh", "optimizer=adam", "optimizer.lr=0.003",
                              "regularizer=[label_smoothing]", "regularizer.label_smoothing.eps=0.1"], False),
    "gelu2-adamw-decay": (["model.depth=2", "model.activation=gelu", "optimizer=adamw", "optimizer.lr=0.003",
                           "optimizer.weight_decay=0.05", "regularizer=[weight_decay]",
                           "regularizer.weight_decay.lam=0.001", "scheduler=cosine"], False),
    "tanh2-rmsprop": (["model.depth=2", "model.activation=tanh", "optimizer=rmsprop", "optimizer.lr=0.001"],
                      False),
    "gelu1-adagrad-step": (["model.depth=1", "model.activation=gelu", "optimizer=adagrad", "optimizer.lr=0.05",
                            "scheduler=step", "scheduler.step_size=100", "scheduler.gamma=0.5"], False),
    "relu1-rmsprop-decay-smoothing": (["model.depth=1", "optimizer=rmsprop", "optimizer.lr=0.001",
                                       "regularizer=[weight_decay,label_smoothing]",
                                       "regularizer.weight_decay.lam=0.001",
                                       "regularizer.label_smoothing.eps=0.05"], False),
}


def _key_bias_rows(name: str, t: torch.Tensor) -> Optional[slice]:
    """The key bias inside attention's stacked q, k, v bias. It adds q·b_k to every score of a
    query, a shift the softmax ignores, so its gradient is zero in exact arithmetic and only
    rounding noise moves it; Adam divides that noise by its own running size and takes
    lr-sized steps with it. Its value is arbitrary: it is checked through the function."""
    return slice(t.shape[0] // 3, 2 * t.shape[0] // 3) if name.endswith("self_attn.in_proj_bias") else None


def _check_weights(final: Dict[str, torch.Tensor], net: nn.Module, x: torch.Tensor) -> None:
    free = []
    for (name, t), p in zip(final.items(), net.parameters()):
        keep = torch.ones_like(t, dtype=torch.bool)
        rows = _key_bias_rows(name, t)
        if rows is not None:
            keep[rows] = False
            free.append((p, t[rows]))
        torch.testing.assert_close(t[keep], p.detach()[keep], atol=ATOL, rtol=RTOL, msg=lambda s: f"{name}: {s}")
    if free:  # the reference with the population's key biases computes the same function
        with torch.no_grad():
            want = net(x)
            for p, t in free:
                p[_key_bias_rows("self_attn.in_proj_bias", p)] = t
            torch.testing.assert_close(net(x), want, atol=LOGIT_ATOL, rtol=0)


def _check_against_reference(cfg, out: Path, metrics: Dict) -> None:
    init = torch.load(out / "init_model.pt", weights_only=True)
    net, running, train_loss = reference_run(cfg, init)
    final = torch.load(out / "model.pt", weights_only=True)
    assert list(final) == list(init)
    x = load_data(cfg.data, cfg.seed).split("train")[0]
    _check_weights(final, net, x if cfg.model.name != "mlp" else x.flatten(1))
    assert not torch.equal(final[next(iter(final))], init[next(iter(init))])  # it trained
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert [r["train_loss"] for r in metrics["history"]] == pytest.approx(train_loss, rel=LOSS_RTOL)
    tb = read_scalars(out)["loss/train_running"]
    assert [s for s, _ in tb] == list(range(1, EPOCHS + 1))
    assert [v for _, v in tb] == pytest.approx(running, rel=LOSS_RTOL)
    assert train_loss[-1] < 0.8 * train_loss[0]  # it learned: the comparison is not of two stalls


@pytest.mark.parametrize("case", list(CASES))
def test_population_of_one_equals_plain_torch(compose_cfg, tmp_path, monkeypatch, case):
    overrides, manual = CASES[case]
    base = compose_cfg(BASE + MLP + overrides)
    seen = _watch_path(monkeypatch)
    point = {"seed": 3}
    (metrics,) = train_population(base, [point], tmp_path)
    assert metrics["status"] == "completed"
    _assert_path(seen, manual)
    _check_against_reference(point_config(base, point), tmp_path / point_name(point), metrics)


def test_member_by_member_form_equals_plain_torch(compose_cfg, tmp_path, monkeypatch):
    # loop_width=1: the wide-bucket CPU form (one GEMM per member on unpadded slices)
    base = compose_cfg(BASE + MLP + ["model.depth=2", "optimizer=momentum", "optimizer.lr=0.02"])
    seen = _watch_path(monkeypatch)
    point = {"seed": 1}
    (metrics,) = train_population(base, [point], tmp_path, Options(loop_width=1))
    _assert_path(seen, True)
    _check_against_reference(point_config(base, point), tmp_path / point_name(point), metrics)


# ---------------------------------------------------------------- manual_step = autograd
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-5  # one step's gradient: summation order only


def _plain_grads(slices, x, y, masks, noise):
    """Loss and gradient of one member by autograd through ``F.linear`` on its unpadded
    tensors: inverted-dropout masks scale the input and each hidden layer; ``noise`` is added
    to each weight in the products (weight noise), the gradient taken at the noisy weights."""
    leaves = [(w.clone().requires_grad_(), b.clone().requires_grad_()) for w, b in slices]
    h = x * masks[0] if masks else x
    for l, (w, b) in enumerate(leaves):
        h = F.linear(h, w + noise[l] if noise else w, b)
        if l < len(leaves) - 1:
            h = torch.relu(h)
            if masks:
                h = h * masks[l + 1][:, :w.shape[0]]
    loss = F.cross_entropy(h, y)
    loss.backward()
    return loss.detach(), [t.grad for pair in leaves for t in pair]


@pytest.mark.parametrize("loop", [False, True], ids=["batched", "member-loop"])
@pytest.mark.parametrize("depth,widths", [(0, [4]), (1, [3, 8, 8]), (2, [5, 16]), (3, [24, 7, 24])])
@pytest.mark.parametrize("dropout,noise", [(False, False), (True, False), (True, True)],
                         ids=["plain", "dropout", "dropout+weight-noise"])
def test_manual_step_gradient_equals_autograd(depth, widths, loop, dropout, noise):
    from regexp.models.mlp import MLP

    torch.manual_seed(depth)
    width, m, b, d, c = max(widths), len(widths), 20, 40, 10
    models = [MLP(d, c, w, depth, "relu") for w in widths]
    net = StackedMLP(models, widths, width, "relu", torch.device("cpu"), loop)
    x, y = torch.randn(m, b, d), torch.randint(0, c, (m, b))
    masks = None
    if dropout:  # inverted dropout, p = 0.2 on the input and 0.5 on hidden layers (padded units too)
        masks = [torch.bernoulli(torch.full((m, b, d), 0.8)) / 0.8]
        masks += [torch.bernoulli(torch.full((m, b, width), 0.5)) / 0.5 for _ in range(depth)]
    deltas = [0.05 * torch.randn_like(w) * (w != 0) for w in net.weights] if noise else None
    noisy = [w.detach() + e for w, e in zip(net.weights, deltas)] if noise else None
    loss = net.manual_step(x, y, masks, noisy)
    grads = [p.grad.clone() for p in net.params]
    for i, k in enumerate(widths):
        slices = [(w[i, :(w.shape[1] if l == depth else k), :(w.shape[2] if l == 0 else k)].detach(),
                   bb[i, 0, :(w.shape[1] if l == depth else k)].detach())
                  for l, (w, bb) in enumerate(zip(net.weights, net.biases))]
        member_noise = ([e[i, :s.shape[0], :s.shape[1]] for e, (s, _) in zip(deltas, slices)] if noise else None)
        member_masks = [mk[i] for mk in masks] if masks else None
        ref_loss, ref = _plain_grads(slices, x[i], y[i], member_masks, member_noise)
        torch.testing.assert_close(loss[i], ref_loss, atol=GRAD_ATOL, rtol=GRAD_RTOL)
        for (name, _, _), g, r in zip(net.named_params(), grads, ref):
            real = net._unpad(i, name, g[i])
            torch.testing.assert_close(real, r, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda s: f"{name}: {s}")
            # the padded units' gradient is exactly zero: the optimizers then keep them zero
            assert torch.count_nonzero(g[i]) == torch.count_nonzero(real), name


NET_CASES = {
    "adam": ["optimizer=adam", "optimizer.lr=0.003"],
    "momentum-cosine-decay-smoothing": ["optimizer=momentum", "optimizer.lr=0.1", "scheduler=cosine",
                                        "regularizer=[weight_decay,label_smoothing]",
                                        "regularizer.weight_decay.lam=0.001", "regularizer.label_smoothing.eps=0.1"],
}


# the MNIST-1D paper's ConvBase (three strided conv stages, flatten head), narrowed to 8
# channels; the default MNIST-1D Transformer (40 tokens of one value, two pre-norm layers, 4
# heads), narrowed to embed_dim 16 (head dimension 4); the paper's GRU (hidden 6,
# bidirectional, flatten head) and a two-layer one with the last states' head: 300 steps of
# any take seconds. (A one-way two-layer GRU of hidden 12 at momentum's lr 0.1 passes through
# loss spikes, epochs 13-19, that grow float32 rounding from 1e-7 to 1e-3: chaos, not a bug.)
NETS = {"cnn": (["model=cnn_mnist1d", "model.channels=[8,8,8]"], 2),
        "transformer": (["model=transformer", "model.embed_dim=16"], 4),
        "gru": (["model=gru"], 5),
        "gru-2-last": (["model=gru", "model.layers=2", "model.head=last", "model.hidden_size=8"], 6)}


@pytest.mark.parametrize("case", list(NET_CASES))
@pytest.mark.parametrize("net", list(NETS))
def test_model_population_of_one_equals_plain_torch(compose_cfg, tmp_path, net, case):
    overrides, seed = NETS[net]
    base = compose_cfg(BASE + overrides + NET_CASES[case])
    point = {"seed": seed}
    (metrics,) = train_population(base, [point], tmp_path)
    assert metrics["status"] == "completed"
    _check_against_reference(point_config(base, point), tmp_path / point_name(point), metrics)
