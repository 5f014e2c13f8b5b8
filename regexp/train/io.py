"""Files a run writes, each atomically: a temporary file in the same folder, then a rename.

A crash or a signal during a save leaves the previous file intact and no partial one.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from regexp.errors import ConfigError


class WriteFailed(RuntimeError):
    """A file could not be written (disk full, read-only, quota): one line naming the path."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e)).lower()
        raise WriteFailed(f"{reason} while writing {path}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


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


def _torch_save(obj: Any, p: Path) -> None:
    # Serialized in memory, then written by Python: a full disk then raises OSError(ENOSPC)
    # instead of torch's own "unexpected pos" error, which does not say why.
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(p, "wb") as f:
        f.write(buf.getbuffer())


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: _torch_save(obj, p))


def load_tensors(path: Path, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only.

    Every file regexp reads back (checkpoints, a transfer run's ``model.pt``, caches) may have
    been placed there by someone else, and a full unpickle runs whatever code the file names.
    A file that needs more than the weights-only unpickler allows is refused, not trusted.
    ``what`` names the file's role in the message, ``fix`` says what the user can do.
    """
    import pickle

    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: one line only
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch says "weights only" for damaged streams too; a refused file names a global
        found = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln), "")
        if not found:
            raise ConfigError(f"{path}: corrupt or truncated {what} (UnpicklingError); {fix}") from None
        found = f" ({found.split(' Please')[0].removeprefix('WeightsUnpickler error: ')[:120]})"
        raise ConfigError(f"{path}: refused to load this {what}: it holds objects other than tensors and "
                          f"plain containers{found}, which regexp never writes; {fix}") from None
    except Exception as e:
        raise ConfigError(f"{path}: corrupt or truncated {what} ({type(e).__name__}); {fix}") from None


def load_checkpoint(path: Path) -> Any:
    return load_tensors(path, "checkpoint", "delete it or start over with trainer.overwrite=true")
