"""M CNNs of one architecture as stacked tensors, each conv stage run as ONE grouped convolution.

The members' activations live side by side in the channel dimension, (B, M·C, L) for signals
and (B, M·C, H, W) for images, so stage s is ``conv1d(h, weight.view(M·C_out, C_in, k),
groups=M)`` (``conv2d`` with (k, k) kernels on images): group m sees only member m's
channels and applies only member m's kernels. Pooling and the activation act per channel, so
they need no member axis at all. The head is a batched product per member. A bucket may
instead run the GEMM form (:mod:`regexp.population.conv_gemm`: activations (M, C, B, *positions),
each stage one ``baddbmm``), whichever measured faster on the machine (``tuning.choose_form``).

Every parameter is stored 3-D with the member first, as :class:`StackedMLP`'s are, so the
shared optimizer, clipping, penalties and checkpoints handle it unchanged: a conv weight as
(M, C_out, C_in·k) (nn.Conv1d's (C_out, C_in, k) with its last two dimensions merged;
nn.Conv2d's (C_out, C_in, k, k) as (M, C_out, C_in·k·k)), a bias
as (M, 1, C_out), the head's weight as (M, classes, features).

Members may differ in ``model.channels``. Each stage is padded to the bucket's widest member
with channels whose weights, bias and outgoing weights are zero. Such a channel computes
act(0): 0 for relu/tanh/gelu (multiplied by the channel mask where act(0) != 0, as for
sigmoid), max- or average-pooling zeros gives zeros, and the head's weights on it (every
position of it under ``head=flatten``) are zero, so it sends nothing on and gets a zero
gradient; every optimizer maps a zero parameter with zero gradient to zero.

Normalized CNNs (``model.norm``) stack each stage's norm scale and shift as (M, 1, C_out), and
batch norm's running statistics as (M, C_out) (``num_batches_tracked`` as (M,)), saved under the
lone model's names (see :mod:`regexp.population.norms`). Batch and instance norm are per
channel: a padded channel, all zeros, normalizes to 0 and, its scale and shift 0, stays 0 with
zero gradient. Layer norm (GroupNorm(1, C)) pools each member's real channels and positions only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.population.conv_gemm import StackedConv
from regexp.population.max_pool import max_pool1d, relu_max_pool1d
from regexp.population.norms import Running, masked_normalize, member_batch_norm
from regexp.population.plain_stack import PlainStack
from regexp.train.sparsity import zero_counts

Channels = Tuple[int, ...]
EVAL_BYTES = 2**25  # one evaluation chunk's activations (all members): fewer, larger conv calls


@dataclass
class _Stage:
    kernel: int
    stride: int
    padding: int
    act: nn.Module
    pool: Optional[str]  # "max" | "avg" | None
    length: int  # output length of the convolution (where the hidden activations are counted)
    norm: Optional[str] = None  # "batch" | "layer" | "instance" | None, after the convolution
    eps: float = 0.0
    momentum: Optional[float] = None  # batch norm's


NORMS = {nn.BatchNorm1d: "batch", nn.BatchNorm2d: "batch", nn.GroupNorm: "layer", nn.InstanceNorm1d: "instance",
         nn.InstanceNorm2d: "instance"}
CONVS = {1: F.conv1d, 2: F.conv2d}
POOLS = {(1, "max"): F.max_pool1d, (1, "avg"): F.avg_pool1d, (2, "max"): F.max_pool2d, (2, "avg"): F.avg_pool2d}
# a normalized stage's stacked tensors: scale and shift (parameters), then batch norm's buffers
NORM_PARAMS, BUFFERS = ("gamma", "beta"), ("mean", "var", "seen")


def stages_of(model: nn.Module) -> List[_Stage]:
    """The lone model's stages, read off its ``features`` (conv, norm, activation, site, pool)."""
    out: List[_Stage] = []
    for mod in model.features:
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            out.append(_Stage(mod.kernel_size[0], mod.stride[0], mod.padding[0], nn.Identity(), None, 0))
        elif isinstance(mod, (nn.MaxPool1d, nn.AvgPool1d, nn.MaxPool2d, nn.AvgPool2d)):
            out[-1].pool = "max" if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) else "avg"
        elif isinstance(mod, (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU)):
            out[-1].act = mod
        elif type(mod) in NORMS:
            if isinstance(mod, nn.GroupNorm) and mod.num_groups != 1:
                raise ValueError("StackedCNN stacks GroupNorm(1, C) (model.norm=layer) only")
            out[-1].norm, out[-1].eps, out[-1].momentum = NORMS[type(mod)], mod.eps, getattr(mod, "momentum", None)
        elif type(mod).__name__ not in ("Identity", "Site"):
            raise ValueError(f"StackedCNN cannot stack a {type(mod).__name__} layer")
    return out


def conv_positions(model: nn.Module, sizes: Sequence[int]) -> List[int]:
    """Each stage's output positions after its convolution (a length, or height x width), for
    inputs of spatial ``sizes`` (L,) or (H, W)."""
    out = []
    for st in stages_of(model):
        sizes = [(n + 2 * st.padding - st.kernel) // st.stride + 1 for n in sizes]
        out.append(math.prod(sizes))
        if st.pool is not None:
            sizes = [n // 2 for n in sizes]
    return out


class StackedCNN(PlainStack):
    """M 1-D CNNs of one layout, stacked (see the module's docstring)."""

    def __init__(self, models: Sequence[nn.Module], channels: Sequence[Channels], width: Channels,
                 input_shape: Sequence[int], device: torch.device):
        first = models[0]
        self.dims = first.dims  # 1: signals (C, L); 2: images (C, H, W)
        self.spatial = tuple(int(n) for n in input_shape[1:])
        convs = [[m for m in model.features if isinstance(m, (nn.Conv1d, nn.Conv2d))] for model in models]
        self.in_channels = convs[0][0].in_channels
        self.flatten = bool(first.flatten)
        self.stages = stages_of(first)
        self.widths = torch.tensor([list(c) for c in channels])  # (M, stages): each member's channels
        self.width_tuple = tuple(int(c) for c in width)
        self.out_len = int(torch.tensor(first.out_sizes).prod())  # positions the head sees per channel
        self.classes = first.head.out_features
        self.device = device
        self.names = [n for n, _ in first.named_parameters()]
        # which member slices each state tensor holds, in state_dict order within parameters and
        # buffers: ("conv", stage) / ("bias", stage) / ("gamma" | "beta", stage) / ("head", _) /
        # ("hbias", _), then ("mean" | "var" | "seen", stage) of batch norm
        self.kinds: List[Tuple[str, int]] = []
        for s, st in enumerate(self.stages):
            self.kinds.append(("conv", s))
            if convs[0][s].bias is not None:
                self.kinds.append(("bias", s))
            if st.norm is not None:
                self.kinds += [(k, s) for k in NORM_PARAMS]
        self.kinds += [("head", 0), ("hbias", 0)] if first.head.bias is not None else [("head", 0)]
        self.kinds += [(k, s) for s, st in enumerate(self.stages) if st.norm == "batch" for k in BUFFERS]
        self.buffer_names = [n for n, _ in first.named_buffers()]
        lone = [[t.detach() for t in [*model.parameters(), *model.buffers()]] for model in models]
        state = [self._stack(j, [t[j] for t in lone], torch.zeros(self._padded_shape(j), dtype=lone[0][j].dtype,
                                                                   device=device))
                 for j in range(len(self.kinds))]
        self.params: List[torch.Tensor] = [t.requires_grad_() for t in state[:len(self.names)]]
        self.buffers: List[torch.Tensor] = state[len(self.names):]
        self.mask_hidden = [float(st.act(torch.zeros(()))) != 0.0 for st in self.stages]
        self.lengths = conv_positions(first, self.spatial)
        self._channel_masks()
        # the engine sizes evaluation chunks by width (activations per example and member)
        self.width = max(c * n for c, n in zip(self.width_tuple, self.lengths))
        self.eval_bytes = EVAL_BYTES
        self.hidden_widths = list(self.width_tuple)
        # the training steps' and evaluation's form (conv_gemm.py); tuning.choose_form sets it
        self.gemm = False
        self.gemm_ok = all(st.stride == 1 and st.norm in (None, "batch") for st in self.stages)

    # ------------------------------------------------------------------ layout
    def _real(self, j: int, member: int) -> Tuple[int, ...]:
        kind, s = self.kinds[j]
        ch = [int(c) for c in self.widths[member]]
        return self._shape(kind, s, ch)

    def _padded_shape(self, j: int) -> Tuple[int, ...]:
        kind, s = self.kinds[j]
        return (len(self.widths), *self._stored(kind, s, list(self.width_tuple)))

    def _shape(self, kind: str, s: int, ch: List[int]) -> Tuple[int, ...]:
        """The lone parameter's shape for channels ``ch``."""
        c_in = self.in_channels if s == 0 else ch[s - 1]
        if kind == "conv":
            return (ch[s], c_in, *[self.stages[s].kernel] * self.dims)
        if kind in ("bias", "gamma", "beta", "mean", "var"):
            return (ch[s],)
        if kind == "seen":
            return ()
        if kind == "head":
            return (self.classes, ch[-1] * (self.out_len if self.flatten else 1))
        return (self.classes,)

    def _stored(self, kind: str, s: int, ch: List[int]) -> Tuple[int, ...]:
        """A member's slice of the stacked parameter (channels ``ch`` = the bucket's)."""
        shape = self._shape(kind, s, ch)
        if kind == "conv":
            return (shape[0], math.prod(shape[1:]))
        if kind in ("bias", "hbias", "gamma", "beta"):
            return (1, shape[0])
        return shape

    def _view(self, j: int, t: torch.Tensor) -> torch.Tensor:
        """Member slice ``t`` (stored layout) as a view in which the lone tensor is a corner."""
        kind, s = self.kinds[j]
        if kind == "conv":
            return t.view(t.shape[0], -1, *[self.stages[s].kernel] * self.dims)
        if kind in ("bias", "hbias", "gamma", "beta"):
            return t[0]
        if kind == "head" and self.flatten:
            return t.view(t.shape[0], -1, self.out_len)
        return t

    def _corner(self, j: int, member: int, t: torch.Tensor) -> torch.Tensor:
        """The lone tensor's entries inside member slice ``t`` (a view)."""
        kind, _ = self.kinds[j]
        real = self._real(j, member)
        v = self._view(j, t)
        if kind == "head" and self.flatten:
            return v[:, :real[1] // self.out_len]
        return v[tuple(slice(0, n) for n in real)]

    def named_params(self) -> List[tuple]:
        """(name, stacked tensor, is_weight) in nn.Module order."""
        return [(n, p, kind in ("conv", "head")) for n, p, (kind, _) in zip(self.names, self.params, self.kinds)]

    @property
    def layer_widths(self) -> List[List[int]]:
        return [[int(c) for c in ch] for ch in self.widths]

    @property
    def weights(self) -> List[torch.Tensor]:
        return [p for p, (kind, _) in zip(self.params, self.kinds) if kind in ("conv", "head")]

    def stack(self, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The members' lone tensors of one parameter, stacked and zero-padded into ``like``'s
        shape: the inverse of :meth:`member_state`."""
        return self._stack(self._index(like), tensors, like)

    def _stack(self, j: int, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like, requires_grad=False)
        for i, t in enumerate(tensors):
            corner = self._corner(j, i, out[i])
            corner.copy_(t.to(out.device, out.dtype).reshape(corner.shape))
        return out

    def _index(self, like: torch.Tensor) -> int:
        for j, p in enumerate(self.params):
            if p is like:
                return j
        shapes = [j for j, p in enumerate(self.params) if p.shape == like.shape]
        if len(shapes) == 1:
            return shapes[0]
        raise ValueError("StackedCNN.stack: 'like' is none of its parameters")

    @property
    def state_names(self) -> List[str]:
        return self.names + self.buffer_names

    @property
    def state_tensors(self) -> List[torch.Tensor]:
        """Everything a member's state_dict holds, stacked: parameters, then buffers."""
        return self.params + self.buffers

    def _running(self, s: int) -> Running:
        """Stage s's batch-norm buffers (mean, var, seen)."""
        at = self.kinds.index(("mean", s)) - len(self.names)
        return tuple(self.buffers[at:at + 3])

    def member_state(self, i: int, tensors: Optional[List[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Member ``i``'s unpadded tensors under nn.Module names (default: its state_dict's,
        parameters and buffers; a list of the parameters alone gives those)."""
        tensors = tensors if tensors is not None else self.state_tensors
        out = {}
        for j, (name, t) in enumerate(zip(self.state_names, tensors)):
            shape = self._real(j, i)
            out[name] = self._corner(j, i, t[i]).detach().reshape(shape).cpu().clone()
        return out

    def param_masks(self) -> Optional[List[torch.Tensor]]:
        """Each parameter's real entries (bool, its shape) per member; None without padding."""
        if bool((self.widths == torch.tensor(self.width_tuple)).all()):
            return None
        return [self._stack(j, [torch.ones(self._real(j, i)) for i in range(len(self.widths))], p) > 0
                for j, p in enumerate(self.params)]

    def _channel_masks(self) -> None:
        """(1, M·C_s, 1) float masks of each stage's real channels ((1, M·C_s, 1, 1) on images),
        which stages are unpadded, and ``unit_mask``: each stage's as (M, 1, C_s·P_s), the real
        units of its recorded site over its P_s positions (None without padding)."""
        self.channel_mask = []
        for s, c in enumerate(self.width_tuple):
            real = torch.arange(c)[None, :] < self.widths[:, s:s + 1]
            self.channel_mask.append(real.float().reshape(1, -1, *[1] * self.dims).to(self.device))
        # stages no member is padded in (layer norm there is torch's own kernel)
        self.unpadded = [bool((self.widths[:, s] == c).all()) for s, c in enumerate(self.width_tuple)]
        m, padded = len(self.widths), not all(self.unpadded)
        self.unit_mask = ([cm.view(m, 1, -1, 1).expand(-1, -1, -1, n).reshape(m, 1, -1)
                           for cm, n in zip(self.channel_mask, self.lengths)] if padded else None)

    def keep(self, idx: torch.Tensor) -> None:
        """Drop every member not in ``idx`` (a finished or diverged one)."""
        sel = idx.to(self.device)
        self.params = [p.detach().index_select(0, sel).requires_grad_() for p in self.params]
        self.buffers = [t.index_select(0, sel) for t in self.buffers]
        self.widths = self.widths.index_select(0, idx.cpu())
        self._channel_masks()

    def weight_corners(self) -> List[List[Tuple[int, int]]]:
        """Per weight (:attr:`weights` order), each member's lone weight as the (rows, cols)
        block at the top left of its stored slice (where weight noise and DropConnect draw)."""
        return [[self._stored(kind, s, [int(c) for c in ch]) for ch in self.widths]
                for kind, s in self.kinds if kind in ("conv", "head")]

    def head_columns(self) -> List[torch.Tensor]:
        """Where each member's features sit among the head's inputs: the first ones."""
        return [torch.arange(self._stored("head", 0, [int(c) for c in ch])[1]) for ch in self.widths]

    @property
    def site_sizes(self) -> Tuple[List[List[int]], List[int]]:
        """Units per example of each stage's dropout site (channels × the convolution's output
        length: the site comes before the pooling), each member's and the bucket's."""
        per = lambda ch: [int(c) * n for c, n in zip(ch, self.lengths)]  # noqa: E731
        return [per(ch) for ch in self.widths], per(self.width_tuple)

    def hidden_units(self, i: int) -> int:
        """Member i's hidden activations per example (channels × positions of every stage)."""
        return sum(int(c) * n for c, n in zip(self.widths[i], self.lengths))

    # ------------------------------------------------------------------ compute
    def _layers(self, weights: Optional[List[torch.Tensor]]):
        """(conv weight, bias) per stage and (head weight, head bias); ``weights`` replaces the
        stored weights (in :attr:`weights` order)."""
        ws = iter(weights) if weights is not None else None
        convs, bias, head, hb = [], [], None, None
        for p, (kind, s) in zip(self.params, self.kinds):
            if kind == "conv":
                convs.append(next(ws) if ws is not None else p)
                bias.append(None)
            elif kind == "bias":
                bias[s] = p
            elif kind == "head":
                head = next(ws) if ws is not None else p
            elif kind == "hbias":
                hb = p
        return list(zip(convs, bias)), (head, hb)

    def _features(self, x: torch.Tensor, weights, training: bool, counts: Optional[torch.Tensor] = None,
                  masks: Optional[List[Optional[torch.Tensor]]] = None,
                  hidden: Optional[List[torch.Tensor]] = None, gemm: bool = False) -> torch.Tensor:
        """Per-member features (M, B, F) the head sees, from inputs (M, B, C_in·L) (images:
        C_in·H·W); ``training``: batch norm on batch statistics (updating the running ones) or on
        the running ones; ``masks``: the dropout masks of the input and of each stage's site,
        (M, B, C·positions) or None; ``hidden`` gains each site's output; ``gemm``: the
        feature-major GEMM form (:mod:`regexp.population.conv_gemm`, once differentiable)
        instead of grouped convolutions."""
        m, b = x.shape[0], x.shape[1]
        if masks and masks[0] is not None:
            x = x * masks[0]
        if gemm:
            return self._features_gemm(x, weights, training, counts, masks, hidden)
        h = x.view(m, b, self.in_channels, -1).transpose(0, 1).reshape(b, m * self.in_channels, *self.spatial)
        stages, _ = self._layers(weights)
        for s, (st, (w, bias)) in enumerate(zip(self.stages, stages)):
            kernel = [st.kernel] * self.dims
            h = CONVS[self.dims](h, w.reshape(-1, w.shape[2] // math.prod(kernel), *kernel),
                                 bias.reshape(-1) if bias is not None else None, st.stride, st.padding, 1, m)
            if st.norm is not None:
                h = self._norm(s, h, training)
            if self._fuses(s, masks, hidden, counts):
                h = relu_max_pool1d(h)
                continue
            h = st.act(h)
            if self.mask_hidden[s]:
                h = h * self.channel_mask[s]
            if masks and masks[s + 1] is not None:  # a member's (C, positions) mask beside the others' channels
                h = h * masks[s + 1].view(m, b, -1, *h.shape[2:]).transpose(0, 1).reshape(h.shape)
            if hidden is not None:  # the stage's site, (M, B, C·positions) as the activity penalties read it
                hidden.append(h.reshape(b, m, -1).transpose(0, 1))
            if counts is not None:
                self._count(h, s, counts)
            if st.pool == "max" and self.dims == 1:
                h = max_pool1d(h)
            elif st.pool is not None:
                h = POOLS[self.dims, st.pool](h, 2)
        c = h.shape[1] // m
        h = h.view(b, m, c, -1)
        if self.flatten:
            return h.transpose(0, 1).reshape(m, b, -1)
        return h.mean(-1).transpose(0, 1)

    def _fuses(self, s: int, masks, hidden, counts) -> bool:
        """Whether stage s's relu and max pooling run as one pass (max_pool.relu_max_pool1d):
        signals, and nothing reads the activations between them (no dropout site mask, no
        recorded site, no counts)."""
        st = self.stages[s]
        return (self.dims == 1 and st.pool == "max" and type(st.act) is nn.ReLU and hidden is None
                and counts is None and not (masks and masks[s + 1] is not None))

    def _features_gemm(self, x: torch.Tensor, weights, training: bool, counts: Optional[torch.Tensor],
                       masks: Optional[List[Optional[torch.Tensor]]],
                       hidden: Optional[List[torch.Tensor]]) -> torch.Tensor:
        """:meth:`_features` on (M, C, B, *positions) activations, each stage one batched GEMM."""
        m, b = x.shape[0], x.shape[1]
        h = x.view(m, b, self.in_channels, *self.spatial).transpose(1, 2)
        stages, _ = self._layers(weights)
        for s, (st, (w, bias)) in enumerate(zip(self.stages, stages)):
            sizes = h.shape[3:]
            h = StackedConv.apply(h, w, bias, st.kernel, st.padding)
            h = h[(Ellipsis, *[slice(0, n + 2 * st.padding - st.kernel + 1) for n in sizes])]
            c = h.shape[1]
            if st.norm is not None:  # batch norm only (gemm_ok): members' channels as one batch's
                g_, b_ = (self.params[self.kinds.index((k, s))] for k in NORM_PARAMS)
                h = member_batch_norm(h.reshape(1, m * c, -1), self._running(s), g_, b_, training, st.momentum,
                                      st.eps).view(h.shape)
            if self._fuses(s, masks, hidden, counts):
                pooled = relu_max_pool1d(h.reshape(m * c, b, -1))
                h = pooled.view(m, c, b, -1)
                continue
            h = st.act(h)
            if self.mask_hidden[s]:
                h = h * self.channel_mask[s].view(m, c, 1, *[1] * self.dims)
            if masks and masks[s + 1] is not None:
                h = h * masks[s + 1].view(m, b, c, *h.shape[3:]).transpose(1, 2)
            if hidden is not None:
                hidden.append(h.transpose(1, 2).reshape(m, b, -1))
            if counts is not None:
                real = self.channel_mask[s].view(m, c, *[1] * (h.dim() - 2))
                counts += zero_counts(h, tuple(range(1, h.dim())), real)
            if st.pool is not None:
                flat = h.reshape(m * c, b, *h.shape[3:])  # batch as channels: pooling is per position
                pooled = (max_pool1d(flat) if st.pool == "max" and self.dims == 1
                          else POOLS[self.dims, st.pool](flat, 2))
                h = pooled.view(m, c, b, *pooled.shape[2:])
        c = h.shape[1]
        if self.flatten:
            return h.reshape(m, c, b, -1).transpose(1, 2).reshape(m, b, -1)
        return h.reshape(m, c, b, -1).mean(-1).transpose(1, 2)

    def _norm(self, s: int, h: torch.Tensor, training: bool) -> torch.Tensor:
        """Stage s's normalization of the convolution's output (B, M·C, *positions), each
        member's own."""
        st = self.stages[s]
        g, b = (self.params[self.kinds.index((k, s))] for k in NORM_PARAMS)  # (M, 1, C) each
        if st.norm == "batch":
            return member_batch_norm(h, self._running(s), g, b, training, st.momentum, st.eps)
        if st.norm == "instance":
            return F.instance_norm(h, weight=g.reshape(-1), bias=b.reshape(-1), eps=st.eps)
        m = len(self.widths)
        if self.unpadded[s]:  # GroupNorm(1, C) of each member is GroupNorm(M) of them all
            return F.group_norm(h, m, g.reshape(-1), b.reshape(-1), st.eps)
        n, c = h.shape[0], h.shape[1] // m
        y = masked_normalize(h.view(n, m, c, -1), self.channel_mask[s].view(1, m, c, 1), (2, 3), st.eps)
        return (y * g.view(1, m, c, 1) + b.view(1, m, c, 1)).view(h.shape)

    def _count(self, h: torch.Tensor, s: int, counts: torch.Tensor) -> None:
        """Add member by member the real channels' activations that are 0 and near 0."""
        m, n = counts.shape[0], h.shape[0]
        c = h.shape[1] // m
        counts += zero_counts(h.reshape(n, m, c, -1), (0, 2, 3), self.channel_mask[s].view(1, m, c, 1))

    def forward(self, x: torch.Tensor, masks: Optional[List[Optional[torch.Tensor]]] = None,
                weights: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D); ``masks``: the dropout sites' (input, then each
        stage's); ``weights`` replaces the stored weights (weight noise, DropConnect)."""
        self.hidden = []
        feats = self._features(x, weights, True, None, masks, self.hidden if self.record else None, self.gemm)
        if self.record:
            self.head_input = feats
        return self._head(feats, weights)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D) as a lone model's eval mode computes them, through
        autograd (the probes differentiate it): no dropout, batch norm on the running statistics,
        which stay as they are, and nothing recorded."""
        return self._head(self._features(x, None, False), None)

    def _head(self, feats: torch.Tensor, weights: Optional[List[torch.Tensor]]) -> torch.Tensor:
        _, (w, b) = self._layers(weights)
        return torch.baddbmm(b, feats, w.transpose(1, 2)) if b is not None else torch.bmm(feats, w.transpose(1, 2))

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, chunk: int, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class-major logits (M, C, N) of inputs (M, N, D), ``chunk`` examples at a time;
        ``counts`` (M, 2) gains each member's real hidden activations that are 0 / near 0."""
        m, n = x.shape[0], x.shape[1]
        out = torch.empty(m, self.classes, n, device=x.device, dtype=x.dtype)
        _, (w, b) = self._layers(None)
        for i in range(0, n, chunk):
            feats = self._features(x[:, i:i + chunk], None, False, counts, gemm=self.gemm)
            z = torch.bmm(w, feats.transpose(1, 2))
            out[:, :, i:i + chunk] = z + b.transpose(1, 2) if b is not None else z
        return out
