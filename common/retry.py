"""The one retry policy: how many tries, and how long to wait before each.

A job's retries are scheduled in PostgreSQL with `RetryPolicy.delay` (the sweeper or the
queue runs the next attempt); a retry inside a process (an outcome write through a
PostgreSQL outage, a bridge's delivery through a function's outage) waits the same way,
run by tenacity through `RetryPolicy.retrying`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity

log = logging.getLogger(__name__)


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

    def retrying(self, *, retry: tenacity.retry_base, patience: float | None = None,
                 forever: Callable[[tenacity.RetryCallState], bool] | None = None,
                 stopping: threading.Event | None = None, what: str = "call",
                 ) -> tenacity.Retrying:
        """A tenacity loop waiting `delay(n)` before retry n+1, for what `retry` accepts.

        It stops after `max_retries` retries, or at `patience` seconds if given (then the
        retries are unlimited until it); `forever(state)` true keeps any retry going, and
        a set `stopping` event ends the wait early. When it gives up, the last result is
        returned as it is, or the last error raised.
        """
        def give_up(state: tenacity.RetryCallState) -> bool:
            stopped = stopping is not None and stopping.is_set()
            if forever is not None and forever(state):
                return stopped
            if patience is not None:  # tenacity has drawn the next wait already
                spent = (state.seconds_since_start or 0.0) + state.upcoming_sleep
                return spent > patience or stopped
            return state.attempt_number > self.max_retries or stopped

        def before_sleep(state: tenacity.RetryCallState) -> None:
            outcome = state.outcome
            assert outcome is not None
            failure = outcome.exception() if outcome.failed else outcome.result()
            log.warning("%s failed (%s); retry %d in %.2fs", what, str(failure)[:200],
                        state.attempt_number, state.upcoming_sleep)

        def sleep(seconds: float) -> None:
            if stopping is not None:
                stopping.wait(seconds)
            else:
                time.sleep(seconds)

        return tenacity.Retrying(
            retry=retry, stop=give_up, wait=lambda state: self.delay(state.attempt_number - 1),
            sleep=sleep,
            before_sleep=before_sleep, retry_error_callback=_last_outcome)


def _last_outcome(state: tenacity.RetryCallState) -> Any:
    """When the loop gives up: the last result as it is, or the last error raised."""
    assert state.outcome is not None
    return state.outcome.result()

