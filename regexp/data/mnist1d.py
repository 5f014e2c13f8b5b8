"""MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package and cached.

The published defaults give 4000 training and 1000 test signals of length 40 in 10
classes. ``data.n_test`` asks for a larger test set: the extra signals come from the same
generator with another seed, so the first 1000 test signals stay the published ones.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from regexp.data import register_source
from regexp.data.checks import KEYS, check_tensors, check_writable, data_root
from regexp.errors import ConfigError

PUBLISHED_SEED = 42
NUM_CLASSES, SHAPE = 10, (1, 40)  # what the generator makes; a cache must hold the same
_FIX = "delete the file to regenerate it"


def _generate(num_samples: int, seed: int, train_split: float):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    state = torch.random.get_rng_state()
    d = make_dataset(args)  # seeds numpy and random globally; the runner reseeds afterwards
    torch.random.set_rng_state(state)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return (as_t(d["x"]), torch.as_tensor(d["y"], dtype=torch.long),
            as_t(d["x_test"]), torch.as_tensor(d["y_test"], dtype=torch.long))


def _load_cache(path: Path) -> object:
    """``torch.load(weights_only=True)``: a cache that names anything but tensors is refused,
    never run, and a damaged one is reported instead of silently regenerated over."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # what the weights-only unpickler refused
        if found:
            raise ConfigError(f"{path}: refused to load this MNIST-1D cache: it names {found.group(1)}, "
                              f"but a cache holds only tensors; {_FIX}") from None
        raise ConfigError(f"{path}: corrupt MNIST-1D cache ({type(e).__name__}); {_FIX}") from None


def _cached(path: Path, make):
    """Load ``path`` if it exists, else build it with ``make`` and write it atomically.

    A cache is checked before use, so a damaged or hand-edited file is reported by name
    instead of trained on; ``data.root`` must be writable before anything is generated.
    """
    if path.exists():
        blob = _load_cache(path)
        if not isinstance(blob, dict):
            raise ConfigError(f"{path}: expected a dict of {', '.join(KEYS)}, found a "
                              f"{type(blob).__name__}; {_FIX}")
        tensors = tuple(blob.get(k) for k in KEYS)
        check_tensors(tensors, [str(path)] * 4, NUM_CLASSES, _FIX, shape=SHAPE)
        return tensors
    check_writable(path.parent, f"MNIST-1D must be generated and cached there as {path.name}")
    tensors = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(zip(KEYS, tensors)), tmp)
    os.replace(tmp, path)
    return tensors


@register_source("mnist1d")
def load_mnist1d(cfg):
    root = data_root(cfg)
    x, y, x_test, y_test = _cached(root / "mnist1d_5000_seed42.pt",
                                   lambda: _generate(5000, PUBLISHED_SEED, 0.8))
    extra = (cfg.n_test or len(y_test)) - len(y_test)
    if extra > 0:
        # A whole extra set from another seed, used entirely as test data.
        n = -(-extra // 10) * 10  # the generator makes the same number of each class
        _, _, xe, ye = _cached(root / f"mnist1d_test{n}_seed{PUBLISHED_SEED + 1}.pt",
                               lambda: _generate(n, PUBLISHED_SEED + 1, 0.0))
        x_test, y_test = torch.cat([x_test, xe[:extra]]), torch.cat([y_test, ye[:extra]])
    elif cfg.n_test is not None:
        x_test, y_test = x_test[: cfg.n_test], y_test[: cfg.n_test]
    return x, y, x_test, y_test
