"""M GRU classifiers (regexp/models/gru.py) as stacked tensors, run with batched products.

Every member reads the same steps (the signal's positions, an image's rows), so a layer's input
projections for all steps and both directions are one ``baddbmm``, (D·M, T·B, in) -> (D·M, T·B,
3H), time-major, the reverse direction's members stacked after the forward one's and reading the
steps backwards (ATen's CPU GRU, too, projects all steps before its loop). The recurrence then
runs step by step, every member and direction in one ``baddbmm`` per step, (D·M, B, H), with
nn.GRU's documented gates in ATen's order:

    r = σ(W_ir x + b_ir + W_hr h + b_hr),  z = σ(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = (h − n) ⊙ z + n.

The head reads every step's output (``head=flatten``) or each direction's final state
(``head=last``), as the lone model does.

Members may differ in ``model.hidden_size`` (layers, directions and head are shared). A
narrower member is padded with hidden units whose every weight and bias is zero: such a unit
has r = z = σ(0) = 1/2 and n = tanh(0 + r·0) = 0, so from h = 0 it stays h' = (0 − 0)·z + 0 = 0;
its outgoing weights (the other gates' columns, the next layer's inputs, the head's features)
are zero too, so it sends nothing on and its gradient, and every gradient into its weights, is
exactly zero. Every optimizer maps a zero parameter with zero gradient to zero.

Parameters are stored with the member first, under the lone model's names: nn.GRU's
``weight_ih_l{k}`` (3H, in) as (M, 3H, in) with gate g's unit u at row g·H + u, a layer above
the first reading the previous layer's directions at d·H + u; ``weight_hh`` (M, 3H, H); biases
as (M, 1, 3H); the head's weight (M, classes, features) with member feature (t, d, u) at
t·D·H + d·H + u (flatten) or d·H + u (last).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from regexp.population.plain_stack import GridStack
from regexp.train.sparsity import zero_counts

# one evaluation chunk's activations (all members): the per-step tensors stay cache-sized (8 members
# of hidden 24: chunks of ~50 examples evaluated 1.2x faster than chunks of 400)
EVAL_BYTES = 2**24
Dims = Tuple[Optional[str], ...]


def _layout(name: str) -> Dims:
    """A lone parameter's member dimensions: "G" gate rows (3 · H), "H" hidden units, "DH" the
    previous layer's outputs (D · H), "F" the head's features, None a dimension members share."""
    found = re.fullmatch(r"rnn\.(weight|bias)_(ih|hh)_l(\d+)(_reverse)?", name)
    if found is not None:
        kind, gate, layer = found.group(1), found.group(2), int(found.group(3))
        if kind == "bias":
            return ("G",)
        return ("G", "H") if gate == "hh" else ("G", None if layer == 0 else "DH")
    if name == "head.weight":
        return (None, "F")
    if name == "head.bias":
        return (None,)
    raise ValueError(f"StackedGRU cannot stack parameter {name}")


class StackedGRU(GridStack):
    """M GRU classifiers of one depth, direction count and head, stacked (see the module's docstring)."""

    act = None  # no hand-written step
    eval_bytes = EVAL_BYTES
    perturbed: List[bool]

    def __init__(self, models: Sequence[nn.Module], hidden: Sequence[int], width: int,
                 input_shape: Sequence[int], device: torch.device):
        first = models[0]
        rnn = first.rnn
        self.layers, self.directions = rnn.num_layers, 2 if rnn.bidirectional else 1
        self.input_shape = tuple(int(s) for s in input_shape)
        self.steps = self.input_shape[1]
        self.features = rnn.input_size
        self.flatten = bool(first.flatten)
        self.classes = first.head.out_features
        self.device = device
        self.names = [n for n, _ in first.named_parameters()]
        self.dims = [_layout(n) for n in self.names]
        self.shared = [tuple(p.shape) for p in first.parameters()]  # the shared dimensions' sizes
        self.hidden_size = int(width)  # the bucket's H, which members are padded to
        per_step = self.directions * self.hidden_size
        # what the engine sizes evaluation chunks by: floats one example of one member holds at once
        # (the input projections and the outputs of a layer, and the head's features)
        self.width = self.steps * per_step * 4 + self.head_features(self.hidden_size)
        # a lone GRU refuses weight noise and DropConnect (regularizers/weight_transform.py): no weight takes them
        self.perturbed = [False] * (sum(len(d) >= 2 for d in self.dims) - 1)
        self._set_members(torch.tensor([int(h) for h in hidden]))
        self.params: List[torch.Tensor] = []
        lone = [[p.detach() for p in m.parameters()] for m in models]
        for j in range(len(self.names)):
            like = torch.zeros(self._padded_shape(j), device=device)
            self.params.append(self._stack(j, [ps[j] for ps in lone], like).requires_grad_())

    # ------------------------------------------------------------------ layout
    def head_features(self, h: int) -> int:
        """The head's inputs for hidden size ``h``."""
        return self.directions * h * (self.steps if self.flatten else 1)

    def _set_members(self, hidden: torch.Tensor) -> None:
        self.widths = hidden
        hs = [int(h) for h in hidden]
        self._f_index = [self._feature_index(h) for h in hs]
        f = self.head_features(self.hidden_size)
        padded = any(h != self.hidden_size for h in hs)
        real = torch.zeros(len(hs), 1, f)
        order = torch.arange(f).repeat(len(hs), 1)
        for i, idx in enumerate(self._f_index):
            real[i, 0, idx] = 1.0
            order[i, idx] = torch.arange(len(idx))
        # (M, 1, F) real features of the hidden site, for the activity penalties and the counts
        self.unit_mask = real.to(self.device) if padded else None
        # (M, 1, F): for each stored feature, the member feature it holds (padded ones: themselves),
        # so a dropout mask drawn over a member's features in its own order lands on the padded layout
        self.unit_order = order[:, None].to(self.device) if padded else None

    def _units(self, h: int, blocks: int) -> torch.Tensor:
        """Where units 0..h-1 of each of ``blocks`` blocks of H sit (gates, or directions)."""
        return torch.cat([k * self.hidden_size + torch.arange(h) for k in range(blocks)])

    def _feature_index(self, h: int) -> torch.Tensor:
        """Where member features (t, d, u) of hidden size ``h`` sit among the head's inputs."""
        per_step = self._units(h, self.directions)
        if not self.flatten:
            return per_step
        stride = self.directions * self.hidden_size
        return (torch.arange(self.steps)[:, None] * stride + per_step[None, :]).reshape(-1)

    def _index(self, kind: Optional[str], i: int, size: int) -> torch.Tensor:
        """Positions in the padded dimension of member i's entries along one lone dimension."""
        h = int(self.widths[i])
        if kind is None:
            return torch.arange(size)
        if kind == "G":
            return self._units(h, 3)
        if kind == "H":
            return torch.arange(h)
        if kind == "DH":
            return self._units(h, self.directions)
        return self._f_index[i]

    def _size(self, kind: Optional[str], h: int, shared: int) -> int:
        return {None: shared, "G": 3 * h, "H": h, "DH": self.directions * h, "F": self.head_features(h)}[kind]

    def _lone_shape(self, j: int, h: int) -> Tuple[int, ...]:
        return tuple(self._size(k, h, s) for k, s in zip(self.dims[j], self.shared[j]))

    def _padded_shape(self, j: int) -> Tuple[int, ...]:
        """The stored shape of parameter j: (M, rows, cols), (M, 1, n) for a 1-D one."""
        shape = self._lone_shape(j, self.hidden_size)
        return (len(self.widths), *((1,) + shape if len(shape) == 1 else shape))

    def _grid(self, j: int, i: int) -> Tuple[torch.Tensor, ...]:
        """Advanced indices of member i's lone tensor inside its slice (stored layout)."""
        lone = self._member_shape(j, i)
        return self._pair([self._index(k, i, s) for k, s in zip(self.dims[j], lone)])

    def _member_shape(self, j: int, i: int) -> Tuple[int, ...]:
        return self._lone_shape(j, int(self.widths[i]))

    def named_params(self) -> List[tuple]:
        """(name, stacked tensor, is_weight) in nn.Module order; weights are the lone model's
        parameters of two or more dimensions, as the penalties and the grad-norm log count them."""
        return [(n, p, len(self.dims[j]) >= 2) for j, (n, p) in enumerate(zip(self.names, self.params))]

    @property
    def weights(self) -> List[torch.Tensor]:
        return [p for _, p, is_w in self.named_params() if is_w]

    @property
    def layer_widths(self) -> List[List[int]]:
        """Each member's head features: the units of its one hidden dropout site."""
        return [[self.head_features(int(h))] for h in self.widths]

    @property
    def hidden_widths(self) -> List[int]:
        return [self.head_features(self.hidden_size)]

    @property
    def site_weights(self) -> List[int]:
        """The lone model's two dropout sites: its input feeds the first layer's input weights,
        the features (``hidden_site``) the head."""
        return [0, len(self.weights) - 1]

    def head_columns(self) -> List[torch.Tensor]:
        """Where each member's features sit among the head's inputs."""
        return list(self._f_index)

    def hidden_units(self, i: int) -> int:
        """Member i's hidden activations per example (the features the head reads)."""
        return self.head_features(int(self.widths[i]))

    def param_masks(self) -> Optional[List[torch.Tensor]]:
        """Each parameter's real entries (bool, its stored shape) per member; None without padding."""
        if self.unit_mask is None:
            return None
        return self.real_entries()

    def keep(self, idx: torch.Tensor) -> None:
        """Drop every member not in ``idx`` (a finished or diverged one)."""
        sel = idx.to(self.device)
        self.params = [p.detach().index_select(0, sel).requires_grad_() for p in self.params]
        self._set_members(self.widths.index_select(0, idx.cpu()))

    # ------------------------------------------------------------------ compute
    def _layer(self, x: torch.Tensor, l: int, p: Dict[str, torch.Tensor], m: int, b: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer l of time-major inputs (M, T·B, in): its outputs (M, T, B, D·H) and each
        direction's final state (M, B, D·H)."""
        t, h, d = self.steps, self.hidden_size, self.directions
        ends = ["", "_reverse"][:d]
        # both directions' input projections for all steps in one product: the reverse
        # direction's members read the steps backwards, so step s of every member and direction is
        # one (D·M, B, 3H) view (unbind: its backward is one stack, where indexing step by step
        # would write each step's gradient into a zero tensor of all steps)
        if d == 2:
            x = torch.cat([x, x.view(m, t, b, -1).flip(1).view(m, t * b, -1)], 0)
        w_ih = torch.cat([p[f"rnn.weight_ih_l{l}{e}"] for e in ends], 0).transpose(1, 2)  # (D·M, in, 3H)
        b_ih = torch.cat([p[f"rnn.bias_ih_l{l}{e}"] for e in ends], 0)
        steps = torch.baddbmm(b_ih, x, w_ih).view(d * m, t, b, 3 * h).unbind(1)
        w_hh = torch.cat([p[f"rnn.weight_hh_l{l}{e}"] for e in ends], 0).transpose(1, 2)  # (D·M, H, 3H)
        b_hh = torch.cat([p[f"rnn.bias_hh_l{l}{e}"] for e in ends], 0)  # (D·M, 1, 3H)
        state = x.new_zeros(d * m, b, h)
        outs = []
        step = self._step if torch.is_grad_enabled() else self._step_
        for g in steps:
            state = step(g, torch.baddbmm(b_hh, state, w_hh), state, h)
            outs.append(state)
        out = torch.stack(outs, 1)  # (D·M, T, B, H)
        if d == 2:  # position t: the forward direction's step t beside the reverse one's step T-1-t
            out = torch.cat([out[:m], out[m:].flip(1)], -1)
        final = state.view(d, m, b, h).permute(1, 2, 0, 3).reshape(m, b, d * h)
        return out, final

    @staticmethod
    def _step(g: torch.Tensor, gh: torch.Tensor, state: torch.Tensor, h: int) -> torch.Tensor:
        """The next state from the step's input and state projections (D·M, B, 3H), ATen's
        order: r, z = σ(gh + g); n = tanh(g_n + gh_n·r); h' = (h - n)·z + n."""
        g_rz, g_n = g.split([2 * h, h], -1)
        gh_rz, gh_n = gh.split([2 * h, h], -1)
        r, z = torch.sigmoid(gh_rz + g_rz).split([h, h], -1)
        n = torch.tanh(torch.addcmul(g_n, gh_n, r))
        return torch.addcmul(n, state - n, z)

    @staticmethod
    def _step_(g: torch.Tensor, gh: torch.Tensor, state: torch.Tensor, h: int) -> torch.Tensor:
        """:meth:`_step` without a graph (evaluation), in place in ``gh``: fewer allocations."""
        rz = gh[..., :2 * h].add_(g[..., :2 * h]).sigmoid_()
        n = torch.addcmul(g[..., 2 * h:], gh[..., 2 * h:], rz[..., :h]).tanh_()
        return torch.addcmul(n, state - n, rz[..., h:])

    def _features(self, x: torch.Tensor, counts: Optional[torch.Tensor] = None,
                  masks: Optional[List[Optional[torch.Tensor]]] = None,
                  p: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The features (M, B, F) the head reads, of inputs (M, B, D); ``masks``: the input's and
        the hidden site's dropout masks, either None; ``p``: the tensors by name (default: the
        parameters); ``counts`` (M, 2) gains the real features that are 0 / near 0."""
        m, b = x.shape[0], x.shape[1]
        if masks and masks[0] is not None:
            x = x * masks[0]
        p = p if p is not None else dict(zip(self.names, self.params))
        # time-major (M, T, B, features): (C, L) is L steps of C values, (C, H, W) H rows of C·W,
        # as the lone model reads them
        seq = x.reshape(m, b, *self.input_shape)
        seq = seq.permute(0, 3, 1, 2) if seq.dim() == 4 else seq.permute(0, 3, 1, 2, 4)
        h = seq.reshape(m, self.steps * b, self.features)
        for l in range(self.layers):
            out, final = self._layer(h, l, p, m, b)
            h = out.reshape(m, self.steps * b, -1)
        feats = out.transpose(1, 2).reshape(m, b, -1) if self.flatten else final
        if masks and len(masks) > 1 and masks[1] is not None:  # a member's mask covers its features in its own order
            mask = masks[1]
            feats = feats * (mask.gather(2, self.unit_order.expand_as(mask)) if self.unit_order is not None else mask)
        if counts is not None:  # the hidden site: padded features are no units
            counts += zero_counts(feats, (1, 2), self.unit_mask)
        return feats

    def forward(self, x: torch.Tensor, masks: Optional[List[Optional[torch.Tensor]]] = None,
                weights: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D); ``masks``: the dropout sites' (:attr:`site_weights`);
        ``weights`` replaces the stored weights (unused: nothing perturbs a GRU's, see :attr:`perturbed`)."""
        p = dict(zip(self.names, self.params))
        if weights is not None:
            p.update(zip([n for n, _, is_w in self.named_params() if is_w], weights))
        h = self._features(x, None, masks, p)
        if self.record:  # the hidden site's output, as the activity penalties and aux heads read it
            self.hidden, self.head_input = [h], h
        return torch.baddbmm(p["head.bias"], h, p["head.weight"].transpose(1, 2))

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, chunk: int, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class-major logits (M, C, N) of inputs (M, N, D), ``chunk`` examples at a time;
        ``counts`` (M, 2) gains each member's real hidden activations that are 0 / near 0."""
        m, n = x.shape[0], x.shape[1]
        p = dict(zip(self.names, self.params))
        out = torch.empty(m, self.classes, n, device=x.device, dtype=x.dtype)
        for i in range(0, n, chunk):
            feats = self._features(x[:, i:i + chunk], counts)
            out[:, :, i:i + chunk] = torch.baddbmm(p["head.bias"].transpose(1, 2), p["head.weight"],
                                                   feats.transpose(1, 2))
        return out
