"""Per-type rate limits: `@job_handler(..., rate_limit="100/m")`, across every worker.

One row per limited type in `rate_limits` (migration 0010) holds the GCRA "theoretical
arrival time" (`tat`): a token bucket kept as one timestamp. Taking a token moves it on by
one interval (period / count), under the row's lock, in the claim's own transaction, with
PostgreSQL's clock. Burst capacity is the count: "5/s" lets 5 attempts start at once, then
one every 0.2 s.

A job over the limit is not refused: it is given the next free slot (the bucket goes
"negative") and deferred to it, without counting an attempt. Its delivery at that time
claims on the reserved slot (`jobs.rate_slot_at`) without taking another token, so a
backlog runs at the rate, one slot each, rather than stampeding back all at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.db import Connection

PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
           "h": 3600.0, "hr": 3600.0, "hour": 3600.0}
MAX_COUNT = 1_000_000
_FORMAT = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class RateLimit:
    """`count` attempts started per `period` seconds on average: a burst of `count` at once,
    then one every `period / count` (one period can hold up to 2 x count - 1 starts)."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two starts once the burst is spent."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{ {1.0: 's', 60.0: 'm', 3600.0: 'h'}[self.period] }"


def parse_rate_limit(text: str) -> RateLimit:
    """`"100/m"` -> RateLimit(100, 60.0); ValueError saying what is accepted otherwise."""
    match = _FORMAT.match(text.lower()) if isinstance(text, str) else None
    if match is None or match.group(2) not in PERIODS:
        raise ValueError(f"rate_limit must be '<count>/<s|m|h>' (e.g. '100/m'), got {text!r}")
    count = int(match.group(1))
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"rate_limit count must be from 1 to {MAX_COUNT}, got {text!r}")
    return RateLimit(count, PERIODS[match.group(2)])


def take_slot(conn: Connection, job_type: str, limit: RateLimit) -> datetime | None:
    """Take the next slot of `job_type`'s bucket: None if it is now (start the job now),
    else the time reserved for it (defer the job to then). In the caller's transaction,
    under the bucket row's lock until it commits."""
    rows = conn.run(
        "INSERT INTO rate_limits AS b (job_type, tat)"
        " VALUES (:t, now() + make_interval(secs => CAST(:gap AS float8)))"
        " ON CONFLICT (job_type) DO UPDATE"
        " SET tat = greatest(b.tat, now()) + make_interval(secs => CAST(:gap AS float8))"
        " RETURNING CASE WHEN b.tat - make_interval(secs => CAST(:burst AS float8)) > now()"
        " THEN b.tat - make_interval(secs => CAST(:burst AS float8)) END",
        t=job_type, gap=limit.interval, burst=limit.period)
    slot: datetime | None = rows[0][0]
    return slot

