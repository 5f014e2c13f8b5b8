"""MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package and cached.

The published defaults give 4000 training and 1000 test signals of length 40 in 10
classes. ``data.n_test`` asks for a larger test set: the extra signals come from the same
generator with another seed, so the first 1000 test signals stay the published ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from regexp.data import register_source
from regexp.errors import ConfigError

PUBLISHED_SEED = 42


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


def _cached(path: Path, make):
    """Load ``path`` if it exists, else build it with ``make`` and write it atomically."""
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return tuple(blob[k] for k in ("x", "y", "x_test", "y_test"))
        except Exception as e:  # truncated or not ours: say so instead of silently regenerating
            raise ConfigError(f"{path}: corrupt MNIST-1D cache ({type(e).__name__}); delete the file "
                              "to regenerate it") from None
    tensors = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(zip(("x", "y", "x_test", "y_test"), tensors)), tmp)
    os.replace(tmp, path)
    return tensors


@register_source("mnist1d")
def load_mnist1d(cfg):
    root = Path(os.path.expanduser(cfg.root))
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
