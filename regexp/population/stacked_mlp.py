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

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}


def linear_layers(model: nn.Module) -> List[tuple]:
    """(weight name, bias name or None, module) of each nn.Linear, input to output."""
    return [(f"{n}.weight", f"{n}.bias" if m.bias is not None else None, m)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _ce_and_grad(logits: torch.Tensor, y: torch.Tensor):
    """Per-member mean cross-entropy of (M, B, C) logits and its gradient (softmax - onehot) / B.
    The log-softmax runs over the classes laid out as (C, M·B) (see ``engine.nll_rows``)."""
    m, b, c = logits.shape
    lp = F.log_softmax(logits.reshape(m * b, c).t().contiguous(), 0)  # (C, M·B)
    yf = y.reshape(1, -1)
    loss = (-lp.gather(0, yf)).view(m, b).mean(1)
    g = lp.exp_()
    g.scatter_add_(0, yf, torch.full_like(yf, -1, dtype=g.dtype))
    g.div_(b)
    return loss, g.view(c, m, b).permute(1, 2, 0)


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

    def forward(self, x: torch.Tensor, masks: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D); ``masks[0]`` scales the input, ``masks[l+1]``
        hidden layer l (inverted dropout, drawn by :mod:`regexp.population.dropout`)."""
        if self.loop:
            return self._forward_loop(x, masks)
        h = x
        if masks and masks[0] is not None:
            h = h * masks[0]
        last = len(self.weights) - 1
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            wt = w.transpose(1, 2)
            h = torch.baddbmm(b, h, wt) if b is not None else torch.bmm(h, wt)
            if l < last:
                h = self.act(h)
                if self.mask_hidden:
                    h = h * self.unit_mask
                if masks and masks[l + 1] is not None:
                    h = h * masks[l + 1]
        return h

    def _forward_loop(self, x: torch.Tensor, masks) -> torch.Tensor:
        """The same function, member by member with nn.Linear's own kernel on unpadded slices.

        ``unbind`` hands each member a view whose gradient flows back with one stack per
        tensor; the slices never touch the padded units, whose gradient stays exactly zero.
        """
        last = len(self.weights) - 1
        ws = [w.unbind(0) for w in self.weights]
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
    def manual_step(self, x: torch.Tensor, y: torch.Tensor,
                    masks: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Forward, per-member mean cross-entropy and its gradient, for relu MLPs with no penalty
        and no label smoothing: the products autograd would run, without its bookkeeping.

        Returns the (M,) losses (the values :meth:`LossTerms.loss` computes) and leaves each
        parameter's ``.grad`` set to the gradient of their sum (each member's own gradient).
        Padded units get exactly zero gradient: their pre-activations are 0, so relu's
        derivative masks them, and the member-by-member form never touches them.
        """
        if self.loop:
            return self._manual_loop(x, y, masks)
        m, bsz = x.shape[0], x.shape[1]
        h = x * masks[0] if masks and masks[0] is not None else x
        hs, rs = [h], []
        last = len(self.weights) - 1
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            wt = w.transpose(1, 2)
            h = torch.baddbmm(b, h, wt) if b is not None else torch.bmm(h, wt)
            if l < last:
                h = torch.relu(h)
                rs.append(h)
                if masks and masks[l + 1] is not None:
                    h = h * masks[l + 1]
                hs.append(h)
        loss, g = _ce_and_grad(h, y)
        dz = g
        for l in range(last, -1, -1):
            w, b = self.weights[l], self.biases[l]
            w.grad = torch.bmm(dz.transpose(1, 2), hs[l])
            if b is not None:
                b.grad = dz.sum(1, keepdim=True)
            if l > 0:
                dh = torch.bmm(dz, w)
                if masks and masks[l] is not None:
                    dh = dh * masks[l]
                dz = torch.ops.aten.threshold_backward(dh, rs[l - 1], 0)
        return loss

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Logits (M, N, C) of inputs (M, N, D), computed ``chunk`` rows at a time (member by
        member in the loop form, each member's chunk cache-sized) into one output tensor."""
        if not self.loop:
            return torch.cat([self.forward(x[:, i:i + chunk]) for i in range(0, x.shape[1], chunk)], 1)
        m_count, n = x.shape[0], x.shape[1]
        last = len(self.weights) - 1
        out = torch.empty(m_count, n, self.weights[-1].shape[1], device=x.device, dtype=x.dtype)
        for m, k in enumerate(self.widths.tolist()):
            ws = []
            for l in range(last + 1):
                w = self.weights[l][m]
                rows, cols = (w.shape[0] if l == last else k), (w.shape[1] if l == 0 else k)
                b = self.biases[l]
                ws.append((w[:rows, :cols], b[m, 0, :rows] if b is not None else None))
            for i in range(0, n, chunk):
                h = x[m, i:i + chunk]
                for l, (w, b) in enumerate(ws):
                    if l < last:
                        h = torch.relu_(F.linear(h, w, b))
                    else:
                        out[m, i:i + chunk] = F.linear(h, w, b)
        return out

    def _grad_buffers(self) -> List[torch.Tensor]:
        """Zero gradients for the member-by-member form, allocated once per parameter set;
        only the members' real slices are ever written, so padding stays exactly zero."""
        key = [(id(p), tuple(p.shape)) for p in self.params]
        if getattr(self, "_grad_key", None) != key:
            self._grad_key = key
            self._grads = [torch.zeros_like(p) for p in self.params]
        return self._grads

    def _manual_loop(self, x, y, masks) -> torch.Tensor:
        last = len(self.weights) - 1
        grads = self._grad_buffers()
        gw, gb, i = [], [], 0
        for b in self.biases:
            gw.append(grads[i])
            i += 1
            gb.append(grads[i] if b is not None else None)
            i += b is not None
        widths = self.widths.tolist()
        acts, outs = [], []
        for m, k in enumerate(widths):
            h = x[m] if not (masks and masks[0] is not None) else x[m] * masks[0][m]
            hs, rs = [h], []
            for l in range(last + 1):
                w = self.weights[l][m]
                rows, cols = (w.shape[0] if l == last else k), (w.shape[1] if l == 0 else k)
                b = self.biases[l]
                h = F.linear(h, w[:rows, :cols], b[m, 0, :rows] if b is not None else None)
                if l < last:
                    h = torch.relu(h)
                    rs.append(h)
                    if masks and masks[l + 1] is not None:
                        h = h * masks[l + 1][m, :, :k]
                    hs.append(h)
            acts.append((hs, rs))
            outs.append(h)
        loss, g = _ce_and_grad(torch.stack(outs), y)
        for m, k in enumerate(widths):
            hs, rs = acts[m]
            dz = g[m]
            for l in range(last, -1, -1):
                w = self.weights[l][m]
                rows, cols = (w.shape[0] if l == last else k), (w.shape[1] if l == 0 else k)
                gw[l][m, :rows, :cols].copy_(dz.t() @ hs[l])
                if gb[l] is not None:
                    torch.sum(dz, 0, out=gb[l][m, 0, :rows])
                if l > 0:
                    dh = dz @ w[:rows, :cols]
                    if masks and masks[l] is not None:
                        dh = dh * masks[l][m, :, :k]
                    dz = torch.ops.aten.threshold_backward(dh, rs[l - 1], 0)
        for p, gr in zip(self.params, grads):
            p.grad = gr
        return loss

    def keep(self, idx: torch.Tensor) -> None:
        """Drop every member not in ``idx`` (a finished or diverged one)."""
        dev = self.unit_mask.device
        sel = idx.to(dev)
        self.weights = [w.detach().index_select(0, sel).requires_grad_() for w in self.weights]
        self.biases = [b.detach().index_select(0, sel).requires_grad_() if b is not None else None
                       for b in self.biases]
        self.unit_mask = self.unit_mask.index_select(0, sel)
        self.widths = self.widths.index_select(0, idx.cpu())

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
