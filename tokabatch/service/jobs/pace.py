"""A running batch's pace: output tokens per second over the last minute, and the time left at it.

Owns the live `throughput` and `eta_seconds` a batch carries while it runs (runner.py samples its
written totals with each progress write). The pace counts the tokens of lines as they are written,
so it moves in steps when many lines finish together; a minute of samples smooths that. The time
left is the lines still unwritten, at the output tokens per finished line so far, at that pace.
Stdlib only.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

WINDOW_S = 60.0
MIN_SPAN_S = 1.0          # a rate over less time than this is noise


class Pace:
    def __init__(self, *, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()   # (time, output tokens written so far)

    def sample(self, output_tokens: int) -> None:
        now = self.clock()
        self._samples.append((now, output_tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()       # keep the newest sample that is still a whole window old

    def throughput(self) -> float | None:
        """Output tokens per second over the window; None until tokens were written over MIN_SPAN_S."""
        if len(self._samples) < 2:
            return None
        (t0, k0), (t1, k1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_SPAN_S or k1 <= k0:
            return None
        return (k1 - k0) / (t1 - t0)

    def eta_seconds(self, *, lines_left: int, lines_completed: int, output_tokens: int) -> float | None:
        """Seconds until the unwritten lines are done at this pace; None while it is unknown."""
        rate = self.throughput()
        if lines_left <= 0:
            return 0.0
        if rate is None or lines_completed <= 0:
            return None
        return lines_left * (output_tokens / lines_completed) / rate


__all__ = ["Pace", "WINDOW_S"]
