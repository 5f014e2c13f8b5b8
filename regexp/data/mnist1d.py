"""MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package and cached.

The published defaults give 4000 training and 1000 test signals of length 40 in 10
classes. ``data.n_test`` asks for a larger test set: the extra signals come from the same
generator with another seed, so the first 1000 test signals stay the published ones.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from regexp.data import register_source
from regexp.data.checks import KEYS, check_tensors, check_writable, data_root
from regexp.errors import ConfigError

PUBLISHED_SEED = 42
NUM_CLASSES, SHAPE = 10, (1, 40)  # what the generator makes; a cache must hold the same
FACTORS_FILE = "mnist1d_5000_seed42_factors.pt"
_FIX = "delete the file to regenerate it"


def _generate(num_samples: int, seed: int, train_split: float, factors: Optional[Path] = None):
    """The generator's signals and labels; with ``factors``, its parameters of every signal are
    written there too (recording the draws costs nothing beside generating)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    state = torch.random.get_rng_state()
    with _recorded_draws() as draws:
        d = make_dataset(args)  # seeds numpy and random globally; the runner reseeds afterwards
    torch.random.set_rng_state(state)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    if factors is not None:
        f = factors_from_draws(draws, args, num_samples)
        _save_atomic(factors, {"train": f[: len(d["y"])], "test": f[len(d["y"]):]})
    return (as_t(d["x"]), torch.as_tensor(d["y"], dtype=torch.long),
            as_t(d["x_test"]), torch.as_tensor(d["y_test"], dtype=torch.long))


def _save_atomic(path: Path, blob) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


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
    _save_atomic(path, dict(zip(KEYS, tensors)))
    return tensors


def _published(root: Path):
    # generating the set also writes its factors: a fresh cache never has to generate twice
    return _cached(root / "mnist1d_5000_seed42.pt", lambda: _generate(5000, PUBLISHED_SEED, 0.8, root / FACTORS_FILE))


@register_source("mnist1d")
def load_mnist1d(cfg):
    root = data_root(cfg)
    x, y, x_test, y_test = _published(root)
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


# ---- the generator's own transformation parameters, per signal (for auxiliary tasks)
# Greydanus's generator draws, for every signal in turn: the zero padding after the template
# (rand), the amplitude scale (rand), the circular shift (choice), two noise vectors (randn)
# and the shear (rand); a permutation then shuffles the signals. Recording those draws gives,
# for free, latent factors each signal was made with, without reimplementing the generator.
FACTORS = ("shift", "scale", "shear", "padding")
_DRAWS = ("rand", "choice", "permutation")


@contextmanager
def _recorded_draws():
    import numpy as np

    draws = {name: [] for name in _DRAWS}
    originals = {name: getattr(np.random, name) for name in _DRAWS}

    def recorder(name):
        def call(*args, **kwargs):
            out = originals[name](*args, **kwargs)
            draws[name].append(out)
            return out
        return call

    try:
        for name in _DRAWS:
            setattr(np.random, name, recorder(name))
        yield draws
    finally:
        for name, fn in originals.items():
            setattr(np.random, name, fn)


def factors_from_draws(draws, args, n: int) -> torch.Tensor:
    """(n, 4) factors in FACTORS order, in the generator's output (shuffled) order: the shift
    in samples of the dilated signal (template_len + padding[1] long, before the subsampling to
    final_seq_length), the scale factor, the shear coefficient and the number of zeros padded."""
    import numpy as np

    if len(draws["rand"]) != 3 * n or len(draws["choice"]) != n or len(draws["permutation"]) != 1:
        raise RuntimeError("the installed mnist1d package draws its random numbers in another order than "
                           "regexp.data.mnist1d expects (3 rand and 1 choice per signal, one permutation)")
    u = np.asarray(draws["rand"], dtype=np.float64).reshape(n, 3)  # padding, scale, shear
    low, high = args.padding
    padding = low + (u[:, 0] * (high - low + 1)).astype(np.int64)
    scale = 1 + args.scale_coeff * (u[:, 1] - 0.5)
    shear = args.shear_scale * (u[:, 2] - 0.5)
    shift = np.asarray(draws["choice"], dtype=np.float64)
    f = np.stack([shift, scale, shear, padding.astype(np.float64)], 1)[draws["permutation"][0]]
    return torch.as_tensor(f, dtype=torch.float32)


def _generate_factors(num_samples: int, seed: int, train_split: float, x_expected: torch.Tensor):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    state = torch.random.get_rng_state()
    with _recorded_draws() as draws:
        d = make_dataset(args)
    torch.random.set_rng_state(state)
    x = torch.as_tensor(d["x"], dtype=torch.float32).unsqueeze(1)
    if x.shape != x_expected.shape or not torch.allclose(x, x_expected, atol=1e-5):
        raise ConfigError("the MNIST-1D cache holds other signals than the installed mnist1d generator makes, "
                          f"so its factors cannot be recovered; {_FIX}")
    f = factors_from_draws(draws, args, len(d["y"]) + len(d["y_test"]))
    return f[: len(x)], f[len(x):]


def load_mnist1d_factors(cfg):
    """The published training and test signals with their generator factors:
    ``(x_train, factors_train, x_test, factors_test)``, factors cached beside the signals."""
    root = data_root(cfg)
    x, y, x_test, y_test = _published(root)
    path = root / FACTORS_FILE
    if path.exists():
        blob = _load_cache(path)
        ok = isinstance(blob, dict) and all(isinstance(blob.get(k), torch.Tensor) for k in ("train", "test"))
        if not ok or blob["train"].shape != (len(y), len(FACTORS)) or blob["test"].shape != (len(y_test), len(FACTORS)):
            raise ConfigError(f"{path}: expected a dict of train ({len(y)}, {len(FACTORS)}) and test "
                              f"({len(y_test)}, {len(FACTORS)}) factor tensors; {_FIX}")
        f, f_test = blob["train"], blob["test"]
    else:
        check_writable(path.parent, f"the MNIST-1D factors must be cached there as {path.name}")
        f, f_test = _generate_factors(5000, PUBLISHED_SEED, 0.8, x)  # a cache older than the factors
        _save_atomic(path, {"train": f, "test": f_test})
    return x, f, x_test, f_test
