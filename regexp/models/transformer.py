"""Transformer encoder classifier on patches.

A 1-D signal ``(C, L)`` becomes ``L / patch`` tokens of ``C * patch`` values (patch 1:
MNIST-1D is a sequence of 40 tokens); an image ``(C, H, W)`` becomes ``patch × patch`` tiles as
in ViT. Tokens get a learned position embedding; the class comes from their mean.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from regexp.models import register_model
from regexp.models.sites import Site


class Transformer(nn.Module):
    def __init__(self, input_shape, num_classes: int, embed_dim: int, depth: int, heads: int,
                 mlp_ratio: float, patch: int):
        super().__init__()
        self.patch = patch
        c = input_shape[0]
        if len(input_shape) == 2:
            n_tokens, token_dim = math.ceil(input_shape[1] / patch), c * patch
        else:
            h, w = (math.ceil(s / patch) for s in input_shape[1:])
            n_tokens, token_dim = h * w, c * patch * patch
        self.input_site = Site("input")
        self.embed = nn.Linear(token_dim, embed_dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, embed_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, heads, int(embed_dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.hidden_site = Site("hidden")
        self.head = nn.Linear(embed_dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if x.dim() == 3:  # (N, C, L) -> (N, L/p, C*p)
            x = F.pad(x, (0, (-x.shape[-1]) % p))
            return x.unfold(2, p, p).permute(0, 2, 1, 3).flatten(2)
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        return F.unfold(x, p, stride=p).transpose(1, 2)  # (N, HW/p², C*p*p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.tokens(self.input_site(x))) + self.pos
        h = self.norm(self.encoder(h)).mean(1)
        return self.head(self.hidden_site(h))


@register_model("transformer")
def build_transformer(cfg, input_shape, num_classes) -> nn.Module:
    patch = cfg.patch_size or (1 if len(input_shape) == 2 else 4)
    return Transformer(input_shape, num_classes, cfg.embed_dim, cfg.depth, cfg.heads, cfg.mlp_ratio,
                       patch)
