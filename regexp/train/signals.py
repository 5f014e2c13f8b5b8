"""SIGTERM / SIGINT become a flag that the step loop reads, so a run stops at a step
boundary with a checkpoint instead of dying mid-update. A second SIGINT stops at once."""
from __future__ import annotations

import signal
import threading
from typing import Optional


class StopFlag:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
