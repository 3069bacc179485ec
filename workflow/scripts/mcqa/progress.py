"""Readable progress lines for long stages."""

from __future__ import annotations

import os
import sys
import time


def say(message: str) -> None:
    """A line in the log, from the first process only (torchrun starts one a GPU)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Meter:
    """Counts items done and prints rate and ETA at most every `every` seconds."""

    def __init__(self, total: int, unit: str, every: float = 10.0):
        self.total, self.unit, self.every = total, unit, every
        self.done = 0
        self.start = self.last_print = self.last_update = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = self.last_update = time.perf_counter()
        if now - self.last_print >= self.every or self.done >= self.total:
            self.last_print = now
            print(self.line(), file=sys.stderr, flush=True)

    def rate(self) -> float:
        """Items per second up to the last update."""
        return self.done / max(self.last_update - self.start, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate else 0.0
        return f"{self.done}/{self.total} {self.unit}  {rate:,.1f} {self.unit}/s  ETA {format_duration(eta)}"
