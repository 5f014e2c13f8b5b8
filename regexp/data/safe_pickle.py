"""Unpickling dataset files without letting them run code.

The CIFAR-10 "python version" is a set of pickles, and a pickle may name any importable
callable (``os.system``, ``builtins.open``, ...) for the unpickler to call. A data folder can
come from anywhere (a shared drive, a mirror, a colleague), so a plain ``pickle.load`` on it
would run whatever the file asks for. The real files hold only dicts, lists, strings, numbers
and numpy arrays; :func:`load` admits the few globals those need and refuses any other with a
:class:`ConfigError` that names the file, before anything is called.
"""
from __future__ import annotations

import builtins
import codecs
import os
import pickle
from typing import Any, Callable, Dict, Tuple

import numpy as np

from regexp.errors import ConfigError

try:  # numpy >= 2 moved the pickle helpers to numpy._core; numpy.core is a deprecated alias
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to what protocol 2 writes for ``bytes``: latin1 only."""
    if encoding not in ("latin1", "latin-1"):  # no codec lookup: it would import modules
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


# (module, name) -> the object it stands for. Files written by Python 2 and numpy 1 (the
# published CIFAR batches) name numpy.core.*, files written now numpy._core.*; protocol 2
# stores bytes as _codecs.encode(str, "latin1"), protocol 5 stores arrays via _frombuffer.
_ALLOWED: Dict[Tuple[str, str], Callable[..., Any]] = {
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(m, n): getattr(builtins, n) for m in ("builtins", "__builtin__")  # Python 3 and 2 names
       for n in ("set", "frozenset", "bytearray", "complex")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` knows only :data:`_ALLOWED`; ``path`` is for messages."""

    def __init__(self, file, path: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles, as torchvision reads them
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ConfigError(f"{self.path}: refused to unpickle {module}.{name}: dataset files may "
                              "hold only arrays, lists, dicts, strings and numbers") from None


def load(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, str(path)).load()
