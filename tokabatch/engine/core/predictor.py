"""Completion-length prediction for admission: how many output tokens will a sequence end with?

Owns the window of recently finished sequences' output lengths. Pure stdlib: must not import torch.

The prediction for a sequence that has already generated g tokens is the mean of the finished
lengths that are > g (the conditional mean: it already survived g tokens), inflated by the
admission margin, clamped to [g + 1, max_tokens]. With too few such samples (cold start, or a
sequence longer than anything seen) it falls back to max_tokens, so until enough sequences have
finished, admission assumes the worst and never overflows.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from tokabatch.engine.core.request import Sequence


class LengthPredictor:
    """Predicts final output lengths from the last `window` finished sequences."""

    def __init__(self, margin: float = 0.1, *, window: int = 1024, min_samples: int = 4) -> None:
        self.margin = margin
        self.min_samples = min_samples
        self._recent: deque[int] = deque(maxlen=window)
        self._sorted: list[int] = []
        self._suffix_sums: list[int] = [0]       # suffix_sums[i] = sum(sorted[i:]), rebuilt lazily
        self._dirty = False

    @property
    def num_samples(self) -> int:
        return len(self._sorted)

    def observe(self, num_output_tokens: int) -> None:
        """Record the output length of a sequence that finished (not aborted, not preempted)."""
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(num_output_tokens)
        bisect.insort(self._sorted, num_output_tokens)
        self._dirty = True

    def predict_output_len(self, num_generated: int, max_tokens: int) -> int:
        """Predicted final number of output tokens, at least num_generated + 1, at most max_tokens."""
        floor = num_generated + 1
        if floor >= max_tokens:
            return max(floor, max_tokens)
        if self._dirty:
            sums = [0] * (len(self._sorted) + 1)
            for i in range(len(self._sorted) - 1, -1, -1):
                sums[i] = sums[i + 1] + self._sorted[i]
            self._suffix_sums = sums
            self._dirty = False
        first = bisect.bisect_right(self._sorted, num_generated)   # samples strictly longer than g
        count = len(self._sorted) - first
        if count < self.min_samples:
            return max_tokens
        mean = self._suffix_sums[first] / count
        return max(floor, min(max_tokens, math.ceil(mean * (1.0 + self.margin))))

    def predict(self, seq: Sequence) -> int:
        """Predicted final output length of `seq` (the scheduler clamps the total to seq.max_len)."""
        return self.predict_output_len(len(seq.output_ids), max(1, seq.sampling.max_tokens))


__all__ = ["LengthPredictor"]
