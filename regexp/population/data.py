"""The data of a population: each member's splits, resident on the device, and its batches.

A member's validation split, subset and label noise depend on its seed (``load_data(cfg,
seed)``), so members that differ in seed or label noise see different training sets of
the same size. Each distinct data set is loaded once; the training sets are stored as one
flat (S·n, D) tensor, and a member's batch is a gather of ``offset + perm[i·B:(i+1)·B]``
with ``perm`` drawn from its own ``Generator().manual_seed(seed)`` exactly as ``train()``
draws it, so every member sees its lone run's batches in its lone run's order.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from regexp.data import Dataset, load_data

SPLITS = ("train", "val", "test")


def data_key(cfg: DictConfig, point: Optional[Dict] = None) -> str:
    """Names a member's data set. Points of one sweep share the base config, so their data
    differs only in the point's ``data.*`` values and seed (cheap, no config conversion)."""
    if point is not None:
        return json.dumps([{k: v for k, v in point.items() if k.startswith("data.")}, int(cfg.seed)],
                          sort_keys=True, default=str)
    return json.dumps([OmegaConf.to_container(cfg.data, resolve=True), int(cfg.seed)], sort_keys=True)


def load_cached(cfg: DictConfig, cache: Dict[str, Dataset], key: Optional[str] = None) -> Dataset:
    """``load_data(cfg.data, cfg.seed)``, loaded once per distinct (data config, seed)."""
    key = key or data_key(cfg)
    if key not in cache:
        cache[key] = load_data(cfg.data, cfg.seed)
    return cache[key]


class PopulationData:
    def __init__(self, cfgs: Sequence[DictConfig], keys: Sequence[str], device: torch.device,
                 cache: Optional[Dict[str, Dataset]] = None):
        cache = cache if cache is not None else {}
        distinct: Dict[str, int] = {}
        self.sets: List[Dataset] = []
        for k, c in zip(keys, cfgs):
            if k not in distinct:
                distinct[k] = len(self.sets)
                self.sets.append(load_cached(c, cache, k))
        self.member_set = torch.tensor([distinct[k] for k in keys])
        first = self.sets[0]
        self.n = len(first.y_train)
        self.num_classes = first.num_classes
        self.input_shape = first.input_shape
        self.device = device
        for s in SPLITS:  # shapes must agree to stack (same data config but label noise / seed)
            sizes = {len(d.split(s)[1]) for d in self.sets}
            if len(sizes) != 1:
                raise ValueError(f"population members have {s} splits of different sizes {sizes}")
        self.x = {s: torch.stack([d.split(s)[0].flatten(1) for d in self.sets]).to(device) for s in SPLITS}
        self.y = {s: torch.stack([d.split(s)[1] for d in self.sets]).to(device) for s in SPLITS}
        self.x_flat = self.x["train"].reshape(-1, self.x["train"].shape[-1])
        self.y_flat = self.y["train"].reshape(-1)

    def dataset(self, i: int) -> Dataset:
        return self.sets[int(self.member_set[i])]

    def epoch_index(self, generators: Sequence[torch.Generator], member_set: torch.Tensor) -> torch.Tensor:
        """(M, n) rows into the flat training tensors: each member's permutation of this epoch."""
        perms = torch.stack([torch.randperm(self.n, generator=g) for g in generators])
        return (perms + member_set[:, None] * self.n).to(self.device)

    def batch(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs (M, B, D) and labels (M, B) of the rows (M, B)."""
        m, b = rows.shape
        flat = rows.reshape(-1)
        return self.x_flat.index_select(0, flat).view(m, b, -1), self.y_flat.index_select(0, flat).view(m, b)

    def split(self, name: str, member_set: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(M, N, D) inputs and (M, N) labels of split ``name`` for the members."""
        sel = member_set.to(self.device)
        if len(self.sets) == 1:  # one data set: a view, not M copies
            m = len(member_set)
            x, y = self.x[name], self.y[name]
            return x.expand(m, *x.shape[1:]), y.expand(m, *y.shape[1:])
        return self.x[name].index_select(0, sel), self.y[name].index_select(0, sel)
