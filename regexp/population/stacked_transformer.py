"""M Transformers (regexp/models/transformer.py) as stacked tensors, run with batched products.

Every member sees the same tokens (patch size and input are shared), so the tokens of a batch
are flattened into rows, (M, B·T, features), and each linear map (patch embedding, attention's
input and output projections, the MLP, the head) is one ``baddbmm`` over the members. Attention
itself runs as one ``scaled_dot_product_attention`` over (M·B, heads). Layer norms are per member:
each member's own scale and shift, (M, 1, E).

Members may differ in ``model.embed_dim`` (``depth``, ``heads``, ``mlp_ratio`` and patch are
shared). They are padded, and the padding is exact rather than approximate:

- The embedding is stored head by head: member m's unit e (head e // d_m, d_m = E_m / heads)
  sits at ``(e // d_m) · d + e % d_m`` of the bucket's E = heads · d, so a head's real
  dimensions stay together and q·k over the padded head is q·k over the real one. The MLP's
  hidden units (int(E_m · mlp_ratio)) are padded at the end.
- Padded weights, biases and layer-norm scales/shifts are zero, so the residual stream, q, k,
  v and the MLP's units are exactly zero there (gelu(0) = 0).
- A layer norm over a padded embedding normalises over the member's real units only: mean and
  variance divide by E_m, the padded entries are masked out of both (and out of the gradient).
- Attention scores are scaled by each member's own 1/√d_m, not the bucket's.

So the padded entries receive exactly zero gradient and stay zero under every optimizer, and
a member computes its lone model's function up to float32 summation order.

Every parameter is stored with the member first, as :class:`StackedMLP`'s are: the lone
tensor with its member dimensions padded, a 1-D one (bias, layer-norm scale) as (M, 1, n), the
position embedding (1, T, E) as (M, T, E). The engine's loop, optimizer, penalties, clipping and
checkpoints use it through the same interface.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.population.plain_stack import GridStack
from regexp.train.sparsity import zero_counts

EVAL_BYTES = 2**25  # one evaluation chunk's activations (all members)
# The member dimensions of each lone parameter, by the end of its name: "E" the embedding,
# "3E" attention's stacked q, k, v, "F" the MLP's hidden units, None a dimension members share.
LAYOUT = {
    "pos": (None, None, "E"), "embed.weight": ("E", None), "embed.bias": ("E",),
    "self_attn.in_proj_weight": ("3E", "E"), "self_attn.in_proj_bias": ("3E",),
    "self_attn.out_proj.weight": ("E", "E"), "self_attn.out_proj.bias": ("E",),
    "linear1.weight": ("F", "E"), "linear1.bias": ("F",), "linear2.weight": ("E", "F"), "linear2.bias": ("E",),
    "norm1.weight": ("E",), "norm1.bias": ("E",), "norm2.weight": ("E",), "norm2.bias": ("E",),
    "norm.weight": ("E",), "norm.bias": ("E",), "head.weight": (None, "E"), "head.bias": (None,),
}


def _layout(name: str) -> Tuple[Optional[str], ...]:
    for suffix, dims in LAYOUT.items():
        if name == suffix or name.endswith("." + suffix):
            return dims
    raise ValueError(f"StackedTransformer cannot stack parameter {name}")


class StackedTransformer(GridStack):
    """M Transformers of one depth, heads and patch, stacked (see the module's docstring)."""

    act = None  # no hand-written relu step
    eval_bytes = EVAL_BYTES

    def __init__(self, models: Sequence[nn.Module], embed_dims: Sequence[int], width: int,
                 input_shape: Sequence[int], device: torch.device):
        first = models[0]
        layers = list(first.encoder.layers)
        self.depth, self.heads = len(layers), layers[0].self_attn.num_heads
        self.eps = [(l.norm1.eps, l.norm2.eps) for l in layers] + [first.norm.eps]
        self.input_shape = tuple(int(s) for s in input_shape)
        self.tokens = first.tokens  # shares only the patch size
        self.n_tokens, self.classes = first.pos.shape[1], first.head.out_features
        self.token_dim = first.embed.in_features
        self.device = device
        self.names = [n for n, _ in first.named_parameters()]
        self.dims = [_layout(n) for n in self.names]
        self.embed = int(width)  # the bucket's embedding, which members are padded to
        if self.embed % self.heads:
            raise ValueError(f"embed_dim {self.embed} is not divisible by heads={self.heads}")
        self.ffn = max(m.encoder.layers[0].linear1.out_features for m in models)
        # what the engine sizes evaluation chunks by: floats one example of one member holds at once
        self.width = self.n_tokens * max(3 * self.embed, self.ffn) + self.heads * self.n_tokens ** 2
        self._set_members(torch.tensor([int(e) for e in embed_dims]),
                          [m.encoder.layers[0].linear1.out_features for m in models])
        self.params: List[torch.Tensor] = []
        lone = [[p.detach() for p in m.parameters()] for m in models]
        for j in range(len(self.names)):
            like = torch.zeros(self._padded_shape(j), device=device)
            self.params.append(self._stack(j, [ps[j] for ps in lone], like).requires_grad_())

    # ------------------------------------------------------------------ layout
    def _set_members(self, embed_dims: torch.Tensor, hidden: Sequence[int]) -> None:
        self.widths = embed_dims
        self.mlp_widths = [int(h) for h in hidden]
        d = self.embed // self.heads
        es = [int(e) for e in embed_dims]
        self._e_index = [self._embed_index(e) for e in es]
        padded = any(e != self.embed for e in es)
        # (M, 1, E) real units of the embedding and their count, for the exact layer norm
        real = torch.zeros(len(es), 1, self.embed)
        for i, idx in enumerate(self._e_index):
            real[i, 0, idx] = 1.0
        self.unit_mask = real.to(self.device) if padded else None
        # (M, 1, E): for each stored unit, the member unit it holds (padded ones: themselves), so a
        # dropout mask drawn over a member's units in its own order lands on the head-by-head layout
        order = torch.arange(self.embed).repeat(len(es), 1)
        for i, idx in enumerate(self._e_index):
            order[i, idx] = torch.arange(len(idx))
        self.unit_order = order[:, None].to(self.device) if padded else None
        self.count = torch.tensor(es, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        # each member's own attention scale 1/√d_m, on q (M, 1, 1, 1, 1)
        scale = [1.0 / math.sqrt(e // self.heads) for e in es]
        self.q_scale = (None if all(e // self.heads == d for e in es)
                        else torch.tensor(scale, device=self.device).view(-1, 1, 1, 1, 1))

    def _embed_index(self, e: int) -> torch.Tensor:
        """Where member units 0..e-1 sit in the bucket's head-by-head embedding."""
        dm, d = e // self.heads, self.embed // self.heads
        u = torch.arange(e)
        return (u // dm) * d + u % dm

    def _index(self, kind: Optional[str], i: int, size: int) -> torch.Tensor:
        """Positions in the padded dimension of member i's entries along one lone dimension."""
        if kind is None:
            return torch.arange(size)
        if kind == "E":
            return self._e_index[i]
        if kind == "3E":
            return torch.cat([part * self.embed + self._e_index[i] for part in range(3)])
        return torch.arange(self.mlp_widths[i])

    def _padded_size(self, kind: Optional[str], size: int) -> int:
        return {None: size, "E": self.embed, "3E": 3 * self.embed, "F": self.ffn}[kind]

    def _padded_shape(self, j: int) -> Tuple[int, ...]:
        """The stored shape of parameter j: (M, rows, cols), (M, 1, n) for a 1-D one."""
        lone = self._lone_shape(j, 0)
        dims = self.dims[j]
        shape = [self._padded_size(k, s) for k, s in zip(dims, lone)]
        if len(shape) == 3:  # pos (1, T, E) -> (T, E)
            shape = shape[1:]
        if len(shape) == 1:
            shape = [1] + shape
        return (len(self.widths), *shape)

    def _lone_shape(self, j: int, i: int) -> Tuple[int, ...]:
        e, f = int(self.widths[i]), self.mlp_widths[i]
        sizes = {"E": e, "3E": 3 * e, "F": f}
        fixed = {"pos": (1, self.n_tokens, e), "head.weight": (self.classes, e), "head.bias": (self.classes,)}
        name = self.names[j]
        if name in fixed:
            return fixed[name]
        if name == "embed.weight":
            return (e, self.token_dim)
        return tuple(sizes[k] for k in self.dims[j])

    def _grid(self, j: int, i: int) -> Tuple[torch.Tensor, ...]:
        """Advanced indices of member i's lone tensor inside its slice (stored layout)."""
        lone = self._lone_shape(j, i)
        dims = self.dims[j]
        idx = [self._index(k, i, s) for k, s in zip(dims, lone)]
        if len(idx) == 3:
            idx = idx[1:]
        return self._pair(idx)

    def _member_shape(self, j: int, i: int) -> Tuple[int, ...]:
        return self._lone_shape(j, i)

    def named_params(self) -> List[tuple]:
        """(name, stacked tensor, is_weight) in nn.Module order; weights are the lone model's
        parameters of two or more dimensions, as the penalties and the grad-norm log count them."""
        return [(n, p, len(self.dims[j]) >= 2) for j, (n, p) in enumerate(zip(self.names, self.params))]

    @property
    def layer_widths(self) -> List[List[int]]:
        """Each member's embedding dimension: the units of its one hidden dropout site."""
        return [[int(e)] for e in self.widths]

    @property
    def perturbed(self) -> List[bool]:
        """Which weights but the head a lone model's Linear transforms (weight noise, DropConnect)
        reach: the patch embedding and the MLP's; attention calls its projections' weights
        directly (never their module) and the position embedding is no layer."""
        names = [n for n, _, is_w in self.named_params() if is_w][:-1]
        return [n == "embed.weight" or n.endswith(("linear1.weight", "linear2.weight")) for n in names]

    def weight_corners(self) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Per weight (:attr:`weights` order), each member's rows and columns in its stored slice."""
        out = []
        for j, (_, _, is_w) in enumerate(self.named_params()):
            if is_w:
                out.append([tuple(ix.reshape(-1) for ix in self._grid(j, i)) for i in range(len(self.widths))])
        return out

    def head_columns(self) -> List[torch.Tensor]:
        """Where each member's features (its embedding's units) sit in the head-by-head layout."""
        return list(self._e_index)

    @property
    def site_weights(self) -> List[int]:
        """The lone model's two dropout sites: its input feeds the patch embedding, the pooled
        features (``hidden_site``) the head (the encoder's own dropout is 0)."""
        return [0, len(self.weights) - 1]

    @property
    def hidden_widths(self) -> List[int]:
        return [self.embed]

    @property
    def weights(self) -> List[torch.Tensor]:
        return [p for _, p, is_w in self.named_params() if is_w]

    def param_masks(self) -> Optional[List[torch.Tensor]]:
        """Each parameter's real entries (bool, its stored shape) per member; None without padding."""
        if self.unit_mask is None and all(h == self.ffn for h in self.mlp_widths):
            return None
        return self.real_entries()

    def keep(self, idx: torch.Tensor) -> None:
        """Drop every member not in ``idx`` (a finished or diverged one)."""
        sel = idx.to(self.device)
        self.params = [p.detach().index_select(0, sel).requires_grad_() for p in self.params]
        self._set_members(self.widths.index_select(0, idx.cpu()), [self.mlp_widths[int(k)] for k in idx])

    def hidden_units(self, i: int) -> int:
        """Member i's hidden activations per example (the pooled features the head reads)."""
        return int(self.widths[i])

    # ------------------------------------------------------------------ compute
    def _layer_norm(self, h: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        """Each member's layer norm over its real units (M, rows, E), its own scale and shift."""
        if self.unit_mask is None:
            return torch.addcmul(b, F.layer_norm(h, (h.shape[-1],), eps=eps), g)
        mask = self.unit_mask
        mean = (h * mask).sum(-1, keepdim=True) / self.count
        xc = (h - mean) * mask  # padded entries leave both moments and the gradient
        var = (xc * xc).sum(-1, keepdim=True) / self.count
        return torch.addcmul(b, xc * torch.rsqrt(var + eps), g)

    def _features(self, x: torch.Tensor, counts: Optional[torch.Tensor] = None,
                  masks: Optional[List[Optional[torch.Tensor]]] = None,
                  p: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The pooled features (M, B, E) the head reads, of inputs (M, B, D); ``masks``: the input's
        and the hidden site's dropout masks (M, B, D) and (M, B, E), either None; ``p``: the
        tensors to compute with by name (default: the parameters)."""
        m, b = x.shape[0], x.shape[1]
        if masks and masks[0] is not None:
            x = x * masks[0]
        p = p if p is not None else dict(zip(self.names, self.params))
        t = self.n_tokens
        tok = self.tokens(x.reshape(m * b, *self.input_shape)).reshape(m, b * t, -1)
        h = torch.baddbmm(p["embed.bias"], tok, p["embed.weight"].transpose(1, 2))
        h = (h.view(m, b, t, -1) + p["pos"][:, None]).view(m, b * t, -1)
        e, nh = self.embed, self.heads
        d = e // nh
        for l in range(self.depth):
            q = lambda s: p[f"encoder.layers.{l}.{s}"]  # noqa: E731
            a = self._layer_norm(h, q("norm1.weight"), q("norm1.bias"), self.eps[l][0])
            qkv = torch.baddbmm(q("self_attn.in_proj_bias"), a, q("self_attn.in_proj_weight").transpose(1, 2))
            qs, ks, vs = qkv.view(m, b, t, 3, nh, d).unbind(3)  # each (M, B, T, heads, d)
            if self.q_scale is not None:
                qs = qs * self.q_scale
            scale = 1.0 if self.q_scale is not None else None
            heads = [s.permute(0, 1, 3, 2, 4).reshape(m * b, nh, t, d) for s in (qs, ks, vs)]
            o = F.scaled_dot_product_attention(*heads, scale=scale)  # (M·B, heads, T, d)
            o = o.view(m, b, nh, t, d).permute(0, 1, 3, 2, 4).reshape(m, b * t, e)
            h = h + torch.baddbmm(q("self_attn.out_proj.bias"), o, q("self_attn.out_proj.weight").transpose(1, 2))
            a = self._layer_norm(h, q("norm2.weight"), q("norm2.bias"), self.eps[l][1])
            a = F.gelu(torch.baddbmm(q("linear1.bias"), a, q("linear1.weight").transpose(1, 2)))
            h = h + torch.baddbmm(q("linear2.bias"), a, q("linear2.weight").transpose(1, 2))
        h = self._layer_norm(h, p["norm.weight"], p["norm.bias"], self.eps[-1]).view(m, b, t, e).mean(2)
        if masks and masks[1] is not None:  # a member's mask covers its units in its own order
            mask = masks[1]
            h = h * (mask.gather(2, self.unit_order.expand_as(mask)) if self.unit_order is not None else mask)
        if counts is not None:  # the hidden site: padded units are no units
            counts += zero_counts(h, (1, 2), self.unit_mask)
        return h

    def forward(self, x: torch.Tensor, masks: Optional[List[Optional[torch.Tensor]]] = None,
                weights: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Logits (M, B, C) of inputs (M, B, D); ``masks``: the dropout sites' (:attr:`site_weights`);
        ``weights`` replaces the stored weights (weight noise, DropConnect)."""
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
