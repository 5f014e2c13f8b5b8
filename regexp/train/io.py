"""Files a run writes, each atomically: a temporary file in the same folder, then a rename.

A crash or a signal during a save leaves the previous file intact and no partial one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from regexp.errors import ConfigError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": JSON has no such numbers
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(_jsonable(obj), indent=2)
    atomic_write(path, lambda p: p.write_text(text + "\n"))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({type(e).__name__}: {e})") from None


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


def load_checkpoint(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}); delete it "
                          "or start over with trainer.overwrite=true") from None
