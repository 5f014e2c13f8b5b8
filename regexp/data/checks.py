"""Checks on what a source hands back and on where it writes, each failing with one clear line.

A damaged or hand-edited data file otherwise shows up much later and far from its cause: a
NaN input as a "diverged" run, a label 200 as a CUDA assert or a silent 201-way output, a
read-only ``data.root`` as a traceback after minutes of generation. Sources call these right
after reading (or before writing), naming the file the user has to fix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from regexp.errors import ConfigError

KEYS = ("x", "y", "x_test", "y_test")


def data_root(cfg) -> Path:
    """``data.root`` with ``~`` expanded; refused if it exists but is not a folder."""
    root = Path(os.path.expanduser(cfg.root))
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.root={root} is a file: expected a folder (created if missing) "
                          "where datasets are cached or downloaded")
    return root


def check_writable(root: Path, why: str) -> None:
    """Refuse ``root`` if it cannot be created or written, before ``why`` happens there.

    The nearest existing ancestor decides: it must be a folder this user may write into.
    """
    existing = root
    while not existing.exists():  # ends at "/" or "." at the latest
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"data.root={root} cannot be created: {existing} is a file; set data.root "
                          f"to a folder you can write ({why})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"data.root={root} is not writable ({existing} is read-only for this user) "
                          f"and {why}; set data.root (or REGEXP_DATA_DIR) to a folder you can write")


def check_tensors(tensors: Sequence[object], names: Sequence[str], num_classes: int, fix: str,
                  shape: Optional[Tuple[int, ...]] = None) -> None:
    """Refuse (x, y, x_test, y_test) unless they are sound, naming ``names[i]`` for tensor i.

    Sound: tensors; float inputs, all finite, of per-example ``shape`` (default: the training
    inputs'); one 1-D integer label in [0, num_classes) per input. ``fix`` ends each message.
    """
    for t, key, name in zip(tensors, KEYS, names):
        if t is None:
            raise ConfigError(f"{name}: {key} is missing; {fix}")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{name}: {key} is a {type(t).__name__}, expected a tensor; {fix}")
    expected = tuple(shape) if shape is not None else tuple(tensors[0].shape[1:])
    for i in (0, 2):
        xs, ys, key, ykey, name, yname = *tensors[i:i + 2], *KEYS[i:i + 2], *names[i:i + 2]
        if not xs.is_floating_point() or xs.dim() < 1 or tuple(xs.shape[1:]) != expected:
            raise ConfigError(f"{name}: {key} must be a float tensor of shape (N, "
                              f"{', '.join(map(str, expected))}), found {xs.dtype} of shape "
                              f"{tuple(xs.shape)}; {fix}")
        bad = int((~torch.isfinite(xs)).sum())
        if bad:
            raise ConfigError(f"{name}: {bad} values of {key} are NaN or infinite; {fix}")
        if ys.is_floating_point() or ys.is_complex() or ys.dtype == torch.bool or ys.dim() != 1:
            raise ConfigError(f"{yname}: labels {ykey} must be a 1-D integer tensor, found {ys.dtype} "
                              f"of shape {tuple(ys.shape)}; {fix}")
        if len(ys) != len(xs):
            raise ConfigError(f"{yname}: {len(ys)} labels {ykey} for {len(xs)} inputs {key}; {fix}")
        out = ys[(ys < 0) | (ys >= num_classes)]
        if len(out):
            raise ConfigError(f"{yname}: labels must be in [0, {num_classes}), found {int(out[0])} "
                              f"({len(out)} such in {ykey}); {fix}")
