"""Progress of an in-process sweep: one bar over every point's epochs, one log line per point.

The bar counts member-epochs: its total is the sum of the points' ``trainer.epochs``, a point
already finished when the sweep starts counts as done (an interrupted one as far as it got),
and a finished point (early stopped, pruned, diverged, failed) counts in full. Its description
names how many points are finished and what trains now (a point, or a population bucket);
tqdm adds the rate and the ETA. It is drawn only when stderr is a terminal (tqdm's
``disable=None``), whatever ``trainer.progress`` says: that switch is the per-run bar's, and
inside a sweep the per-run and per-bucket bars are off so that bars do not stack.

Each finished point (completed, diverged, interrupted, failed, or skipped as already done)
logs ``[i/n] <point>: <status> train_error=... test_error=... (wall s)`` on ``regexp.sweep``.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any, Dict, Iterable, List, Optional, Sequence

from tqdm import tqdm

log = logging.getLogger("regexp.sweep")
# None: the bar shows when stderr is a terminal (tqdm decides); True / False force it off / on.
DISABLE: Optional[bool] = None


def make_bar(total: int, initial: int, desc: str, disable: Optional[bool]) -> tqdm:
    """The sweep's tqdm bar (a separate function so that tests can watch or force it)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", disable=disable, dynamic_ncols=True)


class SweepProgress:
    """The bar and log lines of one sweep over ``points`` whose runs last ``epochs`` epochs each.

    Use: ``start(i, done)`` for points that went some way already, ``open()``, then ``stage()``
    for what trains now, ``reach()`` / ``advance()`` as epochs end, ``finish()`` per finished
    point, and ``close()`` (also a context manager)."""

    def __init__(self, points: Sequence[Dict[str, Any]], epochs: Sequence[int]):
        self.points = list(points)
        self.epochs = [max(int(e), 0) for e in epochs]
        self.counted = [0] * len(self.points)
        self.finished: set = set()
        self.current = ""
        self.bar: Optional[tqdm] = None
        self._stack = ExitStack()

    # ---- set-up
    def start(self, i: int, epochs_done: int) -> None:
        """Point i had ``epochs_done`` epochs before this launch (all of them: finished)."""
        self.counted[i] = min(max(int(epochs_done), 0), self.epochs[i])

    def open(self) -> "SweepProgress":
        if self.bar is None:
            self.bar = make_bar(sum(self.epochs), sum(self.counted), self._desc(), DISABLE)
            if not self.bar.disable:  # log lines above the bar, not through it
                from tqdm.contrib.logging import logging_redirect_tqdm

                self._stack.enter_context(logging_redirect_tqdm())
        return self

    def close(self) -> None:
        if self.bar is not None:
            if len(self.finished) == len(self.points):  # all done: nothing trains now
                self.current = ""
                self._refresh()
            self.bar.close()
        self._stack.close()

    def __enter__(self) -> "SweepProgress":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- while training
    def stage(self, text: str) -> None:
        """What trains now: a point's name, or a population bucket."""
        self.current = text
        self._refresh()

    def reach(self, i: int, epoch: int) -> None:
        """Point i has finished ``epoch`` epochs (a serial run's evaluated epoch)."""
        self._add(i, int(epoch) - self.counted[i])

    def advance(self, indices: Iterable[int], epochs: int = 1) -> None:
        """Each of the points ``indices`` (a population bucket's live members) did ``epochs`` more."""
        n = 0
        for i in indices:
            step = min(epochs, self.epochs[i] - self.counted[i])
            if step > 0:
                self.counted[i] += step
                n += step
        if n and self.bar is not None:
            self.bar.update(n)

    def finish(self, i: int, row: Dict[str, Any]) -> None:
        """Point i is done with ``row`` (``regexp.sweep.result_row``): log it and count it in full,
        unless it was interrupted (then it resumes later and the bar stays where it got)."""
        from regexp.sweep import _summary, point_name

        if row.get("status") != "interrupted":
            self._add(i, self.epochs[i] - self.counted[i])
        self.finished.add(i)
        self._refresh()
        log.info("[%d/%d] %s: %s%s", i + 1, len(self.points), point_name(self.points[i]), row.get("status"),
                 _summary(row))

    # ---- internals
    def _add(self, i: int, n: int) -> None:
        n = min(n, self.epochs[i] - self.counted[i])
        if n > 0:
            self.counted[i] += n
            if self.bar is not None:
                self.bar.update(n)

    def _desc(self) -> str:
        desc = f"sweep {len(self.finished)}/{len(self.points)} points"
        return f"{desc} | {self.current}" if self.current else desc

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_description_str(self._desc(), refresh=False)


def epochs_done(metrics: Dict[str, Any], epochs: int) -> int:
    """How far a point's earlier launch got, from its ``metrics.json`` (``{}`` when none):
    all of it once finished, the epochs of an interrupted or pruned run (it goes on from
    there), none after a failure."""
    status = metrics.get("status")
    if status in ("completed", "diverged"):
        return epochs
    done = metrics.get("epochs")
    if status in ("interrupted", "pruned") and isinstance(done, int):
        return min(done, epochs)
    return 0


def point_epochs(base, points: List[Dict[str, Any]]) -> List[int]:
    """Each point's ``trainer.epochs`` (a point may sweep it); the base's when a point is invalid
    (it fails at its turn, and then counts as done)."""
    from omegaconf import OmegaConf

    from regexp.sweep import point_config

    derived = OmegaConf.is_interpolation(base.trainer, "epochs")
    out = []
    for p in points:
        try:
            own = derived or any(k.startswith("trainer") for k in p)  # else the base's value
            out.append(int(point_config(base, p).trainer.epochs if own else base.trainer.epochs))
        except Exception:  # reported, with its reason, when the point is run
            out.append(int(base.trainer.get("epochs", 0) or 0))
    return out
