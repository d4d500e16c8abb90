"""Retry policy as data: how many retries, and how long to wait before each."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: base * 2**retries_done, capped, +/- jitter."""

    max_retries: int = 3
    base_seconds: float = 1.0
    max_seconds: float = 300.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, retries_done: int, at_least: float | None = None) -> float:
        """Seconds to wait before the next attempt, after `retries_done` retries."""
        raw = min(self.max_seconds, self.base_seconds * (2 ** min(retries_done, 32)))
        if self.jitter and raw:
            raw *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        return max(raw, at_least or 0.0, 0.0)

    def exhausted(self, retries_done: int, max_retries: int | None = None) -> bool:
        """True when no retry is left (the job's own max_retries wins over the policy's)."""
        limit = self.max_retries if max_retries is None else max_retries
        return retries_done >= limit
