"""M MLPs of one depth as stacked tensors, run with batched matrix products.

Layer ``l`` holds ``weight[l]`` of shape (M, out, in) (nn.Linear's layout, one slice per
member) and ``bias[l]`` of shape (M, 1, out). Members narrower than the bucket are padded
with hidden units whose incoming and outgoing weights and biases are zero. Such a unit
computes act(0); for relu/tanh/gelu that is 0, so it sends nothing on and receives a zero
gradient, and every optimizer here maps a zero parameter with zero gradient to zero. For
sigmoid (act(0) = 1/2) the hidden activations are multiplied by the unit mask instead.

Normalized MLPs (``model.norm``) stack each norm's scale and shift as (M, 1, width), and
batch norm's running statistics as (M, width) (``num_batches_tracked`` as (M,)), saved under
the lone model's names. Layer norm takes mean and variance over a member's real units only;
the normalized activations are multiplied by the unit mask, so padded units stay exactly
inert. Residual MLPs add each member's skip where its lone model has one (see
:mod:`regexp.models.mlp`). Uneven hidden widths (``model.widths``) pad each layer to the
bucket's widest for that layer, with a unit mask per layer. These run through autograd in the
batched form only.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.population.norms import masked_normalize, member_batch_norm
from regexp.train.sparsity import zero_counts

NORMS = (nn.BatchNorm1d, nn.LayerNorm)

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}
IN_PLACE = {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_, "gelu": F.gelu}  # no-grad use


def linear_layers(model: nn.Module) -> List[tuple]:
    """(weight name, bias name or None, module) of each nn.Linear, input to output."""
    return [(f"{n}.weight", f"{n}.bias" if m.bias is not None else None, m)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def norm_layers(model: nn.Module) -> List[tuple]:
    """(name, module) of each hidden layer's normalization, input to output (none: [])."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORMS)]


def _fit(h: torch.Tensor, width: int) -> torch.Tensor:
    """``h`` (M, B, D) cut or zero-padded to ``width`` features: a skip's input where some
    members' real widths are narrower than the bucket's (their extra features are padding)."""
    d = h.shape[-1]
    return h[..., :width] if d >= width else F.pad(h, (0, width - d))


def _ce_and_grad(logits: torch.Tensor, y: torch.Tensor):
    """Per-member mean cross-entropy of class-major logits (M, C, B) and its gradient
    (softmax - onehot) / B in the same layout. Over C with B contiguous, torch's CPU
    log-softmax runs vectorized across the batch (see ``engine.nll_rows``)."""
    m, c, b = logits.shape
    lp = F.log_softmax(logits, 1)
    yi = y.view(m, 1, b)
    loss = (-lp.gather(1, yi)).view(m, b).mean(1)
    g = lp.exp_()
    g.scatter_add_(1, yi, _minus_ones(m, b, g.dtype, g.device))
    g.div_(b)
    return loss, g


@functools.lru_cache(maxsize=16)
def _minus_ones(m: int, b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (M, 1, B) -1s the gradient's one-hot term adds: made once per shape, only read."""
    return torch.full((m, 1, b), -1.0, dtype=dtype, device=device)


def _relu_backward_(dh: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """relu's backward written over ``dh``, the incoming gradient (a fresh product no one else
    reads): no new tensor per layer and step."""
    return torch.ops.aten.threshold_backward.grad_input(dh, r, 0, grad_input=dh)


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``dst[:] = a @ b``, in place when ``dst`` is contiguous (a member's slice often is)."""
    if dst.is_contiguous():
        torch.mm(a, b, out=dst)
    else:
        dst.copy_(torch.mm(a, b))


class StackedMLP:
    def __init__(self, models: Sequence[nn.Module], widths: Sequence[int], width: int,
                 activation: str, device: torch.device, loop: bool = False):
        layers = [linear_layers(m) for m in models]
        self.names = [(w, b) for w, b, _ in layers[0]]
        self.widths = torch.tensor(list(widths))
        self.width = width
        # On CPU, one GEMM per member (on the member's real width) inside the one step, where
        # batched GEMMs lose to plain ones (2x at width 1024, 1 thread, on one CPU; which form
        # wins depends on the CPU: population/tuning.py measures it and sets this flag).
        self.loop = loop
        self.act = ACTIVATIONS[activation]
        self.act_ = IN_PLACE[activation]
        m_count, depth = len(models), len(layers[0])
        in_dim, out_dim = layers[0][0][2].in_features, layers[0][-1][2].out_features
        # each member's real hidden widths; uneven ones (model.widths) pad each layer to its widest
        self.layer_widths = [[lin.out_features for _, _, lin in member[:-1]] for member in layers]
        self.uneven = any(len(set(ks)) > 1 for ks in self.layer_widths)
        self.hidden_widths = ([max(ks[l] for ks in self.layer_widths) for l in range(depth - 1)]
                              if self.uneven else [width] * (depth - 1))
        self.weights: List[torch.Tensor] = []
        self.biases: List[Optional[torch.Tensor]] = []
        for l in range(depth):
            rows = out_dim if l == depth - 1 else self.hidden_widths[l]
            cols = in_dim if l == 0 else self.hidden_widths[l - 1]
            w = torch.zeros(m_count, rows, cols)
            b = torch.zeros(m_count, 1, rows) if self.names[l][1] else None
            for i, member in enumerate(layers):
                lin = member[l][2]
                w[i, :lin.out_features, :lin.in_features] = lin.weight.detach()
                if b is not None:
                    b[i, 0, :lin.out_features] = lin.bias.detach()
            self.weights.append(w.to(device).requires_grad_())
            self.biases.append(b.to(device).requires_grad_() if b is not None else None)
        units = torch.arange(width)[None, None, :] < self.widths[:, None, None]
        self.unit_mask = units.float().to(device)  # (M, 1, width): 1 for real units
        self.mask_hidden = float(self.act(torch.zeros(()))) != 0.0
        # As a hidden Site's ``record``: with it set, the autograd forward leaves each hidden
        # layer's activation (M, B, width), after dropout, in ``hidden`` (activity penalties);
        # a padded unit's entries are exactly 0 there, for every activation.
        self.record = False
        self.hidden: List[torch.Tensor] = []
        # the features the output layer read in the last recorded forward (multi_task's heads):
        # the last hidden layer's output, its skip included where it has one; with no hidden
        # layer (depth 0) the input after its dropout mask, as a lone model's head reads its input site
        self.head_input: Optional[torch.Tensor] = None
        self.unit_masks = [(torch.arange(h)[None, None, :] < torch.tensor([ks[l] for ks in self.layer_widths])
                            [:, None, None]).float().to(device) for l, h in enumerate(self.hidden_widths)]
        self._init_norms_and_skips(models, layers, device)

    def _init_norms_and_skips(self, models: Sequence[nn.Module], layers: List[List[tuple]],
                              device: torch.device) -> None:
        """Stacked norm parameters and buffers, residual flags, and each member's own names."""
        norms = [norm_layers(m) for m in models]
        self.norm_kind = type(norms[0][0][1]) if norms[0] else None
        self.norms: List[tuple] = []  # per hidden layer: (scale, shift), (M, 1, width) each
        self.running: List[tuple] = []  # batch norm: (mean, var) (M, width), batches seen (M,)
        m_count = len(models)
        self.norm_prefixes = [n for n, _ in norms[0]]
        for l in range(len(norms[0])):
            mods, width = [n[l][1] for n in norms], self.hidden_widths[l]
            g, b = torch.zeros(m_count, 1, width), torch.zeros(m_count, 1, width)
            mean, var = torch.zeros(m_count, width), torch.ones(m_count, width)
            seen = torch.zeros(m_count, dtype=torch.long)
            for i, mod in enumerate(mods):
                k = mod.weight.shape[0]
                g[i, 0, :k], b[i, 0, :k] = mod.weight.detach(), mod.bias.detach()
                if isinstance(mod, nn.BatchNorm1d):
                    mean[i, :k], var[i, :k] = mod.running_mean, mod.running_var
                    seen[i] = mod.num_batches_tracked
            self.norms.append((g.to(device).requires_grad_(), b.to(device).requires_grad_()))
            if self.norm_kind is nn.BatchNorm1d:
                self.running.append((mean.to(device), var.to(device), seen.to(device)))
        first = norms[0][0][1] if norms[0] else None
        self.eps = first.eps if first is not None else 0.0
        self.momentum = getattr(first, "momentum", None)
        # a hidden layer is residual for a member where its lone model wraps it in a skip
        skips = [[".body." in f"{wn}." for wn, _, _ in member[:-1]] for member in layers]
        self.skips: List[Optional[torch.Tensor]] = [
            torch.tensor([s[l] for s in skips], dtype=torch.float32, device=device).view(-1, 1, 1)
            if any(s[l] for s in skips) else None for l in range(len(skips[0]))]
        self.fancy = self.uneven or self.norm_kind is not None or any(s is not None for s in self.skips)
        if self.fancy:  # autograd in the batched form only (see the module's docstring)
            self.loop = False
        # each member's parameter and buffer names (a skip changes them: hidden.0.body.0.weight)
        buffers = ("running_mean", "running_var", "num_batches_tracked") if self.running else ()
        self.member_names = [[n for n, _ in m.named_parameters()] + [f"{n}.{b}" for n, _ in nl for b in buffers]
                             for m, nl in zip(models, norms)]

    @property
    def params(self) -> List[torch.Tensor]:
        return [p for _, p, _ in self.named_params()]

    @property
    def site_sizes(self) -> Tuple[List[List[int]], List[int]]:
        """Units per example of each hidden dropout site: each member's, and the bucket's (padded)."""
        return self.layer_widths, self.hidden_widths

    @property
    def site_units(self) -> List[torch.Tensor]:
        """Each hidden site's mask of real units, (M, 1, width of layer l): what the activity
        penalties weigh the recorded activations with (uneven ``model.widths``: a mask per layer)."""
        return self.unit_masks

    def head_columns(self) -> List[torch.Tensor]:
        """Where each member's features sit among the output layer's inputs: the first ones
        (all of the input's, with no hidden layer)."""
        return [torch.arange(ks[-1] if ks else self.weights[-1].shape[2]) for ks in self.layer_widths]

    @property
    def site_weights(self) -> List[int]:
        """The weight each dropout site feeds (the input's first): every linear layer has one."""
        return list(range(len(self.weights)))

    def named_params(self) -> List[tuple]:
        """(name, stacked tensor, is_weight) in nn.Module order (the first member's names)."""
        out = []
        names = iter(self.member_names[0])
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            out.append((next(names), w, True))
            if b is not None:
                out.append((next(names), b, False))
            if l < len(self.norms):
                out += [(next(names), t, False) for t in self.norms[l]]
        return out

    def named_buffers(self) -> List[tuple]:
        """(name, stacked tensor) of batch norm's running statistics, in nn.Module order."""
        names = self.member_names[0][len(self.named_params()):]
        return list(zip(names, [t for r in self.running for t in r]))

    @property
    def state_tensors(self) -> List[torch.Tensor]:
        """Everything a member's state_dict holds, stacked: parameters, then buffers."""
        return self.params + [t for _, t in self.named_buffers()]

    def param_masks(self) -> Optional[List[torch.Tensor]]:
        """Each parameter's real entries (bool, its shape) per member; None without padding."""
        if not self.uneven and bool((self.widths == self.width).all()):
            return None
        real = [u[:, 0].bool() for u in self.unit_masks]  # (M, width of layer l) each
        last, out = len(self.weights) - 1, []
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            rows = torch.ones(w.shape[0], w.shape[1], dtype=torch.bool, device=w.device) if l == last else real[l]
            cols = torch.ones(w.shape[0], w.shape[2], dtype=torch.bool, device=w.device) if l == 0 else real[l - 1]
            out.append(rows[:, :, None] & cols[:, None, :])
            if b is not None:
                out.append(rows[:, None, :].clone())
            if l < len(self.norms):  # the norm's scale and shift, (M, 1, width) as the bias
                out += [real[l][:, None, :].clone() for _ in self.norms[l]]
        return out

    def forward(self, x: torch.Tensor, masks: Optional[List[Optional[torch.Tensor]]] = None,
                weights: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D); ``masks[0]`` scales the input, ``masks[l+1]``
        hidden layer l (inverted dropout, drawn by :mod:`regexp.population.dropout`);
        ``weights`` replaces the stored weights in the computation (weight noise)."""
        if self.loop:
            return self._forward_loop(x, masks, weights)
        self.hidden = []
        if self.fancy:
            return self._forward_general(x, masks, weights, True)
        h = x
        if masks and masks[0] is not None:
            h = h * masks[0]
        last = len(self.weights) - 1
        for l, (w, b) in enumerate(zip(weights or self.weights, self.biases)):
            wt = w.transpose(1, 2)
            h = torch.baddbmm(b, h, wt) if b is not None else torch.bmm(h, wt)
            if l < last:
                h = self.act(h)
                if self.mask_hidden:
                    h = h * self.unit_mask
                if masks and masks[l + 1] is not None:
                    h = h * masks[l + 1]
                if self.record:
                    self.hidden.append(h)
        if self.record:
            self.head_input = self.hidden[-1] if self.hidden else self._masked_input(x, masks)
        return h

    @staticmethod
    def _masked_input(x: torch.Tensor, masks) -> torch.Tensor:
        """What a depth-0 output layer reads: the input, times its dropout mask."""
        return x * masks[0] if masks and masks[0] is not None else x

    def _forward_general(self, x: torch.Tensor, masks, weights, training: bool,
                         counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward` with norms and skips: linear, norm, activation, then the hidden site
        (unit mask, dropout), then the member's skip, as each lone layer computes it.
        ``training``: batch statistics (and running-statistics updates) or the running ones;
        ``counts``: see :meth:`eval_logits`."""
        h = x * masks[0] if masks and masks[0] is not None else x
        last = len(self.weights) - 1
        for l, (w, b) in enumerate(zip(weights or self.weights, self.biases)):
            wt = w.transpose(1, 2)
            z = torch.baddbmm(b, h, wt) if b is not None else torch.bmm(h, wt)
            if l == last:
                if training and self.record:  # a residual layer's skip included, as the head reads it
                    self.head_input = h
                return z
            if self.norms:
                z = self._norm(l, z, training)
            a = self.act(z)
            if self.norms or self.mask_hidden:
                a = a * self.unit_masks[l]
            if counts is not None:  # padded units are no units: masked out
                counts += zero_counts(a, (1, 2), self.unit_masks[l])
            if masks and masks[l + 1] is not None:
                a = a * masks[l + 1]
            if training and self.record:  # the hidden site's activation, before the skip
                self.hidden.append(a)
            h = a + _fit(h, a.shape[-1]) * self.skips[l] if self.skips[l] is not None else a
        return h

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D) as a lone model's eval mode computes them, through
        autograd (the probes differentiate it): no dropout, batch norm on the running statistics,
        which stay as they are, and nothing recorded."""
        if not self.fancy:
            return self.forward(x)
        return self._forward_general(x, None, None, False)

    def _norm(self, l: int, z: torch.Tensor, training: bool) -> torch.Tensor:
        """Hidden layer l's normalization of pre-activations (M, B, width), each member's own."""
        g, b = self.norms[l]
        m, n, w = z.shape
        if self.running:
            y = member_batch_norm(z.transpose(0, 1).reshape(n, m * w), self.running[l], g, b, training,
                                  self.momentum, self.eps)
            return y.view(n, m, w).transpose(0, 1)
        mask = self.unit_masks[l]
        if bool((mask.sum(2) == w).all()):
            return F.layer_norm(z, (w,), eps=self.eps) * g + b
        return masked_normalize(z, mask, (2,), self.eps) * g + b  # over each member's real units only

    def _forward_loop(self, x: torch.Tensor, masks, weights=None) -> torch.Tensor:
        """The same function, member by member with nn.Linear's own kernel on unpadded slices.

        ``unbind`` hands each member a view whose gradient flows back with one stack per
        tensor; the slices never touch the padded units, whose gradient stays exactly zero.
        """
        last = len(self.weights) - 1
        ws = [w.unbind(0) for w in (weights or self.weights)]
        bs = [b.unbind(0) if b is not None else None for b in self.biases]
        outs, hidden = [], [[] for _ in range(last)]
        for m, k in enumerate(self.widths.tolist()):
            h = x[m] if not (masks and masks[0] is not None) else x[m] * masks[0][m]
            for l in range(last + 1):
                w = ws[l][m]
                rows, cols = (w.shape[0] if l == last else k), (w.shape[1] if l == 0 else k)
                h = F.linear(h, w[:rows, :cols], bs[l][m][0, :rows] if bs[l] is not None else None)
                if l < last:
                    h = self.act(h)
                    if masks and masks[l + 1] is not None:
                        h = h * masks[l + 1][m, :, :k]
                    if self.record:  # zero-padded to the bucket's width, as the batched form's
                        hidden[l].append(F.pad(h, (0, self.width - k)))
            outs.append(h)
        self.hidden = [torch.stack(hs) for hs in hidden] if self.record else []
        if self.record:
            self.head_input = self.hidden[-1] if self.hidden else self._masked_input(x, masks)
        return torch.stack(outs)

    def manual_step(self, x: torch.Tensor, y: torch.Tensor, masks: Optional[List[Optional[torch.Tensor]]] = None,
                    weights: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Forward, per-member mean cross-entropy and its gradient, for relu MLPs with no penalty
        and no label smoothing: the products autograd would run, without its bookkeeping.

        Returns the (M,) losses (the values :meth:`LossTerms.loss` computes) and leaves each
        parameter's ``.grad`` set to the gradient of their sum (each member's own gradient).
        Padded units get exactly zero gradient: their pre-activations are 0, so relu's
        derivative masks them, and the member-by-member form never touches them.

        Activations are kept feature-major, (M, features, B): every product then has the
        batch as its long contiguous side, which the CPU GEMMs of these thin shapes (10
        classes, 40 inputs) run 1.2-1.4x faster than the batch-major layout (measured).
        ``weights`` (weight noise) are used in the products; the gradient, taken there, is
        each stored weight's own.
        """
        if torch.is_grad_enabled():  # the engine's loop runs under no_grad already: no second context
            with torch.no_grad():
                return self.manual_step(x, y, masks, weights)
        if self.loop:
            return self._manual_loop(x, y, masks, weights)
        bias_cols, weights_t = self._transposed()
        if weights is not None:  # weight noise: this step's weights, not the stored ones
            weights_t = [w.transpose(1, 2) for w in weights]
        weights = weights or self.weights
        x = x * masks[0] if masks and masks[0] is not None else x
        a = x.transpose(1, 2)  # (M, D, B)
        acts, rs = [a], []
        last = len(self.weights) - 1
        for l, (w, b) in enumerate(zip(weights, bias_cols)):
            z = torch.baddbmm(b, w, a) if b is not None else torch.bmm(w, a)
            if l < last:
                r = torch.relu_(z)
                rs.append(r)
                a = r * masks[l + 1].transpose(1, 2) if masks and masks[l + 1] is not None else r
                acts.append(a)
        loss, dz = _ce_and_grad(z, y)
        for l in range(last, -1, -1):
            b = self.biases[l]
            self.weights[l].grad = torch.bmm(dz, acts[l].transpose(1, 2) if l else x)
            if b is not None:
                b.grad = dz.sum(2).unsqueeze(1)
            if l > 0:
                dh = torch.bmm(weights_t[l], dz)
                if masks and masks[l] is not None:
                    dh = dh * masks[l].transpose(1, 2)
                dz = _relu_backward_(dh, rs[l - 1])
        return loss

    def _transposed(self) -> Tuple[List[Optional[torch.Tensor]], List[torch.Tensor]]:
        """Feature-major views of the stored biases (M, out, 1) and weights (M, in, out), made
        once per set of stacked tensors (:meth:`keep` makes new ones), not once per step: the
        optimizer updates the tensors in place, which the views see."""
        key = self.weights + self.biases
        cached = getattr(self, "_views", None)
        if cached is None or len(cached[0]) != len(key) or any(a is not b for a, b in zip(cached[0], key)):
            self._views = (key, ([b.transpose(1, 2) if b is not None else None for b in self.biases],
                                 [w.transpose(1, 2) for w in self.weights]))
        return self._views[1]

    def _member_layers(self, m: int, k: int, weights: Optional[List[torch.Tensor]] = None) -> List[tuple]:
        """Member m's unpadded (weight, bias) views, input to output (hidden width k)."""
        last = len(self.weights) - 1
        out = []
        for l, (w, b) in enumerate(zip(weights or self.weights, self.biases)):
            rows = w.shape[1] if l == last else k
            cols = w.shape[2] if l == 0 else k
            out.append((w[m, :rows, :cols], b[m, 0, :rows] if b is not None else None))
        return out

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, chunk: int, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class-major logits (M, C, N) of inputs (M, N, D), ``chunk`` examples at a time
        (member by member in the loop form, each member's chunk cache-sized). ``counts`` (M, 2),
        if given, gains each member's hidden activations of its real units that are exactly 0
        and that are below ``NEAR_ZERO`` in magnitude (:mod:`regexp.train.sparsity`)."""
        m_count, n = x.shape[0], x.shape[1]
        last = len(self.weights) - 1
        out = torch.empty(m_count, self.weights[-1].shape[1], n, device=x.device, dtype=x.dtype)
        if self.fancy:
            for i in range(0, n, chunk):
                z = self._forward_general(x[:, i:i + chunk], None, None, False, counts)
                out[:, :, i:i + chunk] = z.transpose(1, 2)
            return out
        if not self.loop:
            hidden_mask = self.unit_mask.transpose(1, 2) if self.mask_hidden else None
            real = self.unit_mask.transpose(1, 2)
            for i in range(0, n, chunk):
                a = x[:, i:i + chunk].transpose(1, 2)
                for l, (w, b) in enumerate(zip(self.weights, self.biases)):
                    z = torch.baddbmm(b.transpose(1, 2), w, a) if b is not None else torch.bmm(w, a)
                    if l < last:
                        a = self.act_(z) if hidden_mask is None else self.act_(z) * hidden_mask
                        if counts is not None:  # padded units are no units: masked out
                            counts += zero_counts(a, (1, 2), real)
                out[:, :, i:i + chunk] = z
            return out
        for m, k in enumerate(self.widths.tolist()):
            layers = self._member_layers(m, k)
            for i in range(0, n, chunk):
                a = x[m, i:i + chunk].t()
                for l, (w, b) in enumerate(layers):
                    z = torch.addmm(b[:, None], w, a) if b is not None else torch.mm(w, a)
                    if l < last:
                        a = self.act_(z)
                        if counts is not None:
                            counts[m] += zero_counts(a, (0, 1))
                out[m, :, i:i + chunk] = z
        return out

    def _grad_buffers(self) -> List[torch.Tensor]:
        """Zero gradients for the member-by-member form, allocated once per parameter set;
        only the members' real slices are ever written, so padding stays exactly zero."""
        key = [(id(p), tuple(p.shape)) for p in self.params]
        if getattr(self, "_grad_key", None) != key:
            self._grad_key = key
            self._grads = [torch.zeros_like(p) for p in self.params]
        return self._grads

    def _manual_loop(self, x, y, masks, weights=None) -> torch.Tensor:
        """:meth:`manual_step`, member by member on unpadded slices (feature-major too)."""
        last = len(self.weights) - 1
        grads = iter(self._grad_buffers())
        gw, gb = [], []
        for b in self.biases:
            gw.append(next(grads))
            gb.append(next(grads) if b is not None else None)
        widths = self.widths.tolist()
        saved, outs = [], []
        for m, k in enumerate(widths):
            layers = self._member_layers(m, k, weights)
            a = (x[m] * masks[0][m] if masks and masks[0] is not None else x[m]).t()  # (D, B)
            acts, rs = [a], []
            for l, (w, b) in enumerate(layers):
                z = torch.addmm(b[:, None], w, a) if b is not None else torch.mm(w, a)
                if l < last:
                    r = torch.relu_(z)
                    rs.append(r)
                    a = r * masks[l + 1][m, :, :k].t() if masks and masks[l + 1] is not None else r
                    acts.append(a)
            saved.append((layers, acts, rs))
            outs.append(z)
        loss, g = _ce_and_grad(torch.stack(outs), y)
        for m, k in enumerate(widths):
            layers, acts, rs = saved[m]
            dz = g[m]
            for l in range(last, -1, -1):
                w, b = layers[l]
                _mm_into(gw[l][m, :w.shape[0], :w.shape[1]], dz, acts[l].t())
                if b is not None:
                    torch.sum(dz, 1, out=gb[l][m, 0, :w.shape[0]])
                if l > 0:
                    dh = torch.mm(w.t(), dz)
                    if masks and masks[l] is not None:
                        dh = dh * masks[l][m, :, :k].t()
                    dz = _relu_backward_(dh, rs[l - 1])
        for p, gr in zip(self.params, self._grad_buffers()):
            p.grad = gr
        return loss

    def hidden_units(self, i: int) -> int:
        """Member i's hidden activations per example."""
        return sum(self.layer_widths[i])

    def keep(self, idx: torch.Tensor) -> None:
        """Drop every member not in ``idx`` (a finished or diverged one)."""
        dev = self.unit_mask.device
        sel = idx.to(dev)
        self.weights = [w.detach().index_select(0, sel).requires_grad_() for w in self.weights]
        self.biases = [b.detach().index_select(0, sel).requires_grad_() if b is not None else None
                       for b in self.biases]
        self.unit_mask = self.unit_mask.index_select(0, sel)
        self.widths = self.widths.index_select(0, idx.cpu())
        self.norms = [tuple(t.detach().index_select(0, sel).requires_grad_() for t in pair) for pair in self.norms]
        self.running = [tuple(t.index_select(0, sel) for t in r) for r in self.running]
        self.skips = [s.index_select(0, sel) if s is not None else None for s in self.skips]
        self.unit_masks = [u.index_select(0, sel) for u in self.unit_masks]
        self.layer_widths = [self.layer_widths[i] for i in idx.tolist()]
        self.member_names = [self.member_names[i] for i in idx.tolist()]

    def stack(self, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The members' unpadded tensors of one parameter (nn.Module layout), stacked and padded
        with zeros into ``like``'s shape: the inverse of :meth:`member_state`."""
        out = torch.zeros_like(like, requires_grad=False)
        for i, t in enumerate(tensors):
            t = t.to(out.device, out.dtype)
            if t.dim() == 2:
                out[i, :t.shape[0], :t.shape[1]] = t
            elif out.dim() == 3:  # a bias or norm parameter (out,) into (1, out)
                out[i, 0, :t.shape[0]] = t
            elif out.dim() == 2:  # a running statistic (width,)
                out[i, :t.shape[0]] = t
            else:  # num_batches_tracked
                out[i] = t
        return out

    def stack_states(self, states: Sequence[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
        """Members' state_dicts (their own names), stacked like :attr:`state_tensors`."""
        return [self.stack([st[names[j]] for st, names in zip(states, self.member_names)], like)
                for j, like in enumerate(self.state_tensors)]

    def member_state(self, i: int, tensors: Optional[List[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Member ``i``'s unpadded tensors under its lone model's names (default: its state_dict's,
        parameters and buffers; a list of the parameters alone gives those)."""
        tensors = tensors if tensors is not None else self.state_tensors
        canonical = [n for n, _, _ in self.named_params()] + [n for n, _ in self.named_buffers()]
        out = {}
        for name, own, t in zip(canonical, self.member_names[i], tensors):
            out[own] = self._unpad(i, name, t[i]).detach().cpu().clone()
        return out

    def _unpad(self, i: int, name: str, t: torch.Tensor) -> torch.Tensor:
        ks = self.layer_widths[i]
        if name not in {n for pair in self.names for n in pair}:  # a hidden norm's tensor
            w = ks[next(l for l, n in enumerate(self.norm_prefixes) if name.startswith(n + "."))]
            return t[0, :w] if t.dim() == 2 else (t[:w] if t.dim() == 1 else t)
        layer = next(l for l, (wn, bn) in enumerate(self.names) if name in (wn, bn))
        last = len(self.names) - 1
        if t.dim() == 2 and name == self.names[layer][0]:  # weight (out, in)
            rows = t.shape[0] if layer == last else ks[layer]
            cols = t.shape[1] if layer == 0 else ks[layer - 1]
            return t[:rows, :cols]
        return t[0, : (t.shape[1] if layer == last else ks[layer])]  # bias (1, out)
