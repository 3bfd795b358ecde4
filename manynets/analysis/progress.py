"""Progress lines of the long analysis passes (subspace sweep, PCA sweep, probe fits, feature-kernel transfer).

These passes run after ``fit`` / ``test``, outside Lightning's loops, so no progress bar shows them: they
print plain lines instead, with or without a terminal, on rank 0 only::

    subspace sweep, BN statistics: 12/40 batches (30 %), 0:00:05 elapsed, 0:00:12 left

A line is printed each time another ``step`` (default 10 %) of the work is done, and at least every
``interval`` seconds while it runs (for a step that takes long); :func:`tracked` wraps an iterable
(a data loader) in one.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Iterable, Iterator, TextIO, TypeVar

from lightning.fabric.utilities.rank_zero import rank_zero_only

T = TypeVar("T")


def duration(seconds: float) -> str:
    """``H:MM:SS`` of a number of seconds (rounded to whole seconds)."""
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class Progress:
    """Count done units of a pass of ``total`` units and print ``<what>: k/n unit (p %), elapsed, left``.

    Args:
        what: what runs, e.g. ``"PCA sweep, deltas"``.
        total: the number of units (None: unknown; then lines give the count and the time only).
        unit: the unit's name in the line (``batches``, ``layers``, ...).
        step: print when another fraction ``step`` of ``total`` is done (0.1: every 10 %).
        interval: also print when this many seconds passed since the last line.
        stream: where lines go (default ``sys.stdout``, read at each line).
    """

    def __init__(self, what: str, total: int | None, unit: str = "", step: float = 0.1, interval: float = 60.0,
                 stream: TextIO | None = None) -> None:  # fmt: skip
        self.what, self.total, self.unit = what, total if total is None else max(int(total), 0), unit
        self.step, self.interval, self.stream = step, interval, stream
        self.done = 0
        self.start = self.last_time = time.monotonic()
        self.next_fraction = step
        self.enabled = rank_zero_only.rank == 0

    def update(self, n: int = 1) -> None:
        """``n`` more units are done; print a line when the next step or ``interval`` is reached."""
        self.done += n
        now = time.monotonic()
        due = now - self.last_time >= self.interval
        if self.total:
            fraction = self.done / self.total
            if fraction >= self.next_fraction - 1e-9 or self.done >= self.total:
                due = True
                while self.next_fraction <= fraction + 1e-9:
                    self.next_fraction += self.step
        if due:
            self.last_time = now
            self.print(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.start
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.what}: {self.done}{unit}, {duration(elapsed)} elapsed"
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        left_text = duration(left) if left == left else "?"
        percent = 100.0 * self.done / self.total
        return (f"{self.what}: {self.done}/{self.total}{unit} ({percent:.0f} %), {duration(elapsed)} elapsed, "
                f"{left_text} left")  # fmt: skip

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)


def tracked(iterable: Iterable[T], what: str, total: int | None = None, unit: str = "batches",
            **options) -> Iterator[T]:  # fmt: skip
    """Yield the items of ``iterable`` while a :class:`Progress` counts them (``total``: default ``len(iterable)``,
    if it has one; ``options``: ``step``, ``interval``, ``stream``)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    progress = Progress(what, total, unit, **options)
    for item in iterable:
        yield item
        progress.update()
