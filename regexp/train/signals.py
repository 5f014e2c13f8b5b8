"""SIGTERM / SIGINT become a flag that training reads, so a run stops at a step boundary with
a checkpoint instead of dying mid-update. A second SIGINT stops at once.

One flag serves the whole process: the CLI installs it before Hydra composes anything
(:func:`install`), so a signal that arrives during start-up is not lost, and every run, sweep
point and population bucket started afterwards sees it. A sweep checks it between points and
raises :class:`Interrupted`: it starts nothing new once asked to stop. A process that has
worker processes (a parallel Hydra launcher) passes SIGTERM on to them, so each of them
checkpoints and exits instead of training on after the parent is gone.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import List, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Raised by sweeps between points once a stop was requested; the CLI exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StopFlag:
    """``with StopFlag() as stop``: ``stop.requested`` turns true on SIGTERM / SIGINT.

    Nested flags share the outermost one, so a run inside a sweep reacts to a signal the sweep
    received before the run began."""

    _active: Optional["StopFlag"] = None

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
        _forward_to_children()

    def __enter__(self) -> "StopFlag":
        if StopFlag._active is not None:
            return StopFlag._active
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
            StopFlag._active = self
        return self

    def __exit__(self, *exc) -> None:
        if StopFlag._active is self:
            for s, h in self._old.items():
                signal.signal(s, h)
            StopFlag._active = None


def install() -> StopFlag:
    """The process-wide flag, in force until the process ends (the CLI calls this first)."""
    return StopFlag().__enter__()


def requested() -> Optional[int]:
    """The signal that asked this process to stop, if any."""
    flag = StopFlag._active
    return flag.signum if flag is not None else None


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested (between sweep points)."""
    signum = requested()
    if signum is not None:
        raise Interrupted(signum)


def _children(pid: int) -> List[int]:
    """Direct child processes of ``pid`` (Linux /proc; elsewhere none)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def _forward_to_children() -> None:
    # Workers of a parallel launcher (joblib/loky, submitit's local executor) are our children.
    # They get SIGTERM, whatever we got: on a terminal Ctrl-C they already received SIGINT from
    # the process group, and a second SIGINT would kill them before they checkpoint.
    for child in _children(os.getpid()):
        try:
            os.kill(child, signal.SIGTERM)
        except OSError:
            pass
