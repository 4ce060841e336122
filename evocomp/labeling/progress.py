"""Progress of a label run: done/total, samples per minute and ETA, logged and shown.

``evocomp label`` registers its progress bar with :class:`progress_hook`; the run's
:class:`Meter` feeds every registered hook, whichever path (Prefect or in-process) runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

_hooks: list[Callable[[int, int], None]] = []


class progress_hook:  # noqa: N801 - used like a function in `with`
    """Within the block, call ``fn(done, total)`` as samples finish (the CLI's progress bar)."""

    def __init__(self, fn: Callable[[int, int], None]):
        self.fn = fn

    def __enter__(self):
        _hooks.append(self.fn)

    def __exit__(self, *exc):
        _hooks.remove(self.fn)


class Meter:
    """Counts finished samples; logs done/total, rate and ETA at most every ``every_s`` s."""

    def __init__(self, total: int, log, every_s: float = 10.0):
        self.total, self.log, self.every_s = total, log, every_s
        self.done, self.t0, self.last = 0, time.monotonic(), -math.inf

    def add(self, n: int) -> None:
        """``n`` more samples are finished."""
        self.update(self.done + n)

    def update(self, done: int) -> None:
        """``done`` samples are finished in all (never moves backwards)."""
        n, self.done = done - self.done, max(self.done, min(done, self.total))
        if n <= 0:
            return
        for hook in list(_hooks):
            hook(self.done, self.total)
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last, rate = now, self.done / max(now - self.t0, 1e-9) * 60
            eta = (self.total - self.done) / rate * 60
            self.log.info(
                f"labelled {self.done}/{self.total}: {rate:.1f} samples/min, ETA {eta:.0f} s"
            )
