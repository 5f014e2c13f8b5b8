"""M MLPs of one depth as stacked tensors, run with batched matrix products.

Layer ``l`` holds ``weight[l]`` of shape (M, out, in) (nn.Linear's layout, one slice per
member) and ``bias[l]`` of shape (M, 1, out). Members narrower than the bucket are padded
with hidden units whose incoming and outgoing weights and biases are zero. Such a unit
computes act(0); for relu/tanh/gelu that is 0, so it sends nothing on and receives a zero
gradient, and every optimizer here maps a zero parameter with zero gradient to zero. For
sigmoid (act(0) = 1/2) the hidden activations are multiplied by the unit mask instead.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.train.sparsity import NEAR_ZERO

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}
IN_PLACE = {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_, "gelu": F.gelu}  # no-grad use


def linear_layers(model: nn.Module) -> List[tuple]:
    """(weight name, bias name or None, module) of each nn.Linear, input to output."""
    return [(f"{n}.weight", f"{n}.bias" if m.bias is not None else None, m)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _ce_and_grad(logits: torch.Tensor, y: torch.Tensor):
    """Per-member mean cross-entropy of class-major logits (M, C, B) and its gradient
    (softmax - onehot) / B in the same layout. Over C with B contiguous, torch's CPU
    log-softmax runs vectorized across the batch (see ``engine.nll_rows``)."""
    m, c, b = logits.shape
    lp = F.log_softmax(logits, 1)
    yi = y.view(m, 1, b)
    loss = (-lp.gather(1, yi)).view(m, b).mean(1)
    g = lp.exp_()
    g.scatter_add_(1, yi, torch.full_like(yi, -1, dtype=g.dtype))
    g.div_(b)
    return loss, g


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
        # Wide buckets on CPU: one GEMM per member (on the member's real width) inside the one
        # step, because CPU batched GEMMs lose to plain ones there (2x at width 1024, 1 thread).
        self.loop = loop
        self.act = ACTIVATIONS[activation]
        self.act_ = IN_PLACE[activation]
        m_count, depth = len(models), len(layers[0])
        in_dim, out_dim = layers[0][0][2].in_features, layers[0][-1][2].out_features
        self.weights: List[torch.Tensor] = []
        self.biases: List[Optional[torch.Tensor]] = []
        for l in range(depth):
            rows = out_dim if l == depth - 1 else width
            cols = in_dim if l == 0 else width
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

    @property
    def params(self) -> List[torch.Tensor]:
        return [p for pair in zip(self.weights, self.biases) for p in pair if p is not None]

    def named_params(self) -> List[tuple]:
        """(name, stacked tensor, is_weight) in nn.Module order."""
        out = []
        for (wn, bn), w, b in zip(self.names, self.weights, self.biases):
            out.append((wn, w, True))
            if b is not None:
                out.append((bn, b, False))
        return out

    def param_masks(self) -> Optional[List[torch.Tensor]]:
        """Each parameter's real entries (bool, its shape) per member; None without padding."""
        if bool((self.widths == self.width).all()):
            return None
        real = self.unit_mask[:, 0].bool()  # (M, width)
        last, out = len(self.weights) - 1, []
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            rows = torch.ones(w.shape[0], w.shape[1], dtype=torch.bool, device=w.device) if l == last else real
            cols = torch.ones(w.shape[0], w.shape[2], dtype=torch.bool, device=w.device) if l == 0 else real
            out.append(rows[:, :, None] & cols[:, None, :])
            if b is not None:
                out.append(rows[:, None, :].clone())
        return out

    def forward(self, x: torch.Tensor, masks: Optional[List[Optional[torch.Tensor]]] = None,
                weights: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D); ``masks[0]`` scales the input, ``masks[l+1]``
        hidden layer l (inverted dropout, drawn by :mod:`regexp.population.dropout`);
        ``weights`` replaces the stored weights in the computation (weight noise)."""
        if self.loop:
            return self._forward_loop(x, masks, weights)
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
        return h

    def _forward_loop(self, x: torch.Tensor, masks, weights=None) -> torch.Tensor:
        """The same function, member by member with nn.Linear's own kernel on unpadded slices.

        ``unbind`` hands each member a view whose gradient flows back with one stack per
        tensor; the slices never touch the padded units, whose gradient stays exactly zero.
        """
        last = len(self.weights) - 1
        ws = [w.unbind(0) for w in (weights or self.weights)]
        bs = [b.unbind(0) if b is not None else None for b in self.biases]
        outs = []
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
            outs.append(h)
        return torch.stack(outs)

    @torch.no_grad()
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
        if self.loop:
            return self._manual_loop(x, y, masks, weights)
        weights = weights or self.weights
        a = (x * masks[0] if masks and masks[0] is not None else x).transpose(1, 2)  # (M, D, B)
        acts, rs = [a], []
        last = len(self.weights) - 1
        for l, (w, b) in enumerate(zip(weights, self.biases)):
            z = torch.baddbmm(b.transpose(1, 2), w, a) if b is not None else torch.bmm(w, a)
            if l < last:
                r = torch.relu_(z)
                rs.append(r)
                a = r * masks[l + 1].transpose(1, 2) if masks and masks[l + 1] is not None else r
                acts.append(a)
        loss, dz = _ce_and_grad(z, y)
        for l in range(last, -1, -1):
            b = self.biases[l]
            self.weights[l].grad = torch.bmm(dz, acts[l].transpose(1, 2))
            if b is not None:
                b.grad = dz.sum(2).unsqueeze(1)
            if l > 0:
                dh = torch.bmm(weights[l].transpose(1, 2), dz)
                if masks and masks[l] is not None:
                    dh = dh * masks[l].transpose(1, 2)
                dz = torch.ops.aten.threshold_backward(dh, rs[l - 1], 0)
        return loss

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
        if not self.loop:
            hidden_mask = self.unit_mask.transpose(1, 2) if self.mask_hidden else None
            for i in range(0, n, chunk):
                a = x[:, i:i + chunk].transpose(1, 2)
                for l, (w, b) in enumerate(zip(self.weights, self.biases)):
                    z = torch.baddbmm(b.transpose(1, 2), w, a) if b is not None else torch.bmm(w, a)
                    if l < last:
                        a = self.act_(z) if hidden_mask is None else self.act_(z) * hidden_mask
                        if counts is not None:  # padded units are no units: masked out
                            real = self.unit_mask.transpose(1, 2) > 0
                            counts += torch.stack([((a == 0) & real).sum((1, 2)),
                                                   ((a.abs() < NEAR_ZERO) & real).sum((1, 2))], 1)
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
                            counts[m] += torch.stack([(a == 0).sum(), (a.abs() < NEAR_ZERO).sum()])
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
                    dz = torch.ops.aten.threshold_backward(dh, rs[l - 1], 0)
        for p, gr in zip(self.params, self._grad_buffers()):
            p.grad = gr
        return loss

    def hidden_units(self, i: int) -> int:
        """Member i's hidden activations per example."""
        return int(self.widths[i]) * (len(self.weights) - 1)

    def keep(self, idx: torch.Tensor) -> None:
        """Drop every member not in ``idx`` (a finished or diverged one)."""
        dev = self.unit_mask.device
        sel = idx.to(dev)
        self.weights = [w.detach().index_select(0, sel).requires_grad_() for w in self.weights]
        self.biases = [b.detach().index_select(0, sel).requires_grad_() if b is not None else None
                       for b in self.biases]
        self.unit_mask = self.unit_mask.index_select(0, sel)
        self.widths = self.widths.index_select(0, idx.cpu())

    def stack(self, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The members' unpadded tensors of one parameter (nn.Module layout), stacked and padded
        with zeros into ``like``'s shape: the inverse of :meth:`member_state`."""
        out = torch.zeros_like(like, requires_grad=False)
        for i, t in enumerate(tensors):
            t = t.to(out.device, out.dtype)
            if t.dim() == 2:
                out[i, :t.shape[0], :t.shape[1]] = t
            else:  # a bias (out,) into (1, out)
                out[i, 0, :t.shape[0]] = t
        return out

    def member_state(self, i: int, tensors: Optional[List[torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Member ``i``'s unpadded tensors under nn.Module names (default: its parameters)."""
        tensors = tensors if tensors is not None else self.params
        out = {}
        for (name, p, _), t in zip(self.named_params(), tensors):
            out[name] = self._unpad(i, name, t[i]).detach().cpu().clone()
        return out

    def _unpad(self, i: int, name: str, t: torch.Tensor) -> torch.Tensor:
        w = int(self.widths[i])
        layer = next(l for l, (wn, bn) in enumerate(self.names) if name in (wn, bn))
        last = len(self.names) - 1
        if t.dim() == 2 and name == self.names[layer][0]:  # weight (out, in)
            rows = t.shape[0] if layer == last else w
            cols = t.shape[1] if layer == 0 else w
            return t[:rows, :cols]
        return t[0, : (t.shape[1] if layer == last else w)]  # bias (1, out)
