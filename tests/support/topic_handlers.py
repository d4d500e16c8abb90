"""Job types with a Kafka topic of their own, loaded (JOBS_HANDLER_MODULES) only by the
stack of tests/integration/test_topics.py (and test_tls: tests/integration/conftest.py):
every other stack keeps its one job queue."""

from __future__ import annotations

import time
from typing import Any

from common.errors import PermanentError
from common.handlers import JobContext, job_handler

LANE = "job-queue-slow-lane"


@job_handler("SLOW_LANE", topic=LANE, timeout_seconds=60)
def slow_lane(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Work for `seconds` (cooperatively): a flood of these fills the lane's consumers."""
    deadline = time.monotonic() + float(payload.get("seconds", 1.0))
    while time.monotonic() < deadline and not ctx.should_stop():
        time.sleep(0.02)
    return {"attempt": ctx.attempt}


@job_handler("LANE_RETRY_NOW", topic=LANE, backoff_base_seconds=0)
def lane_retry_now(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Fail the first attempt; no backoff, so `process` requeues the retry itself."""
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"attempt": ctx.attempt}


@job_handler("LANE_RETRY_LATER", topic=LANE, backoff_base_seconds=0.2,
             backoff_max_seconds=0.2)
def lane_retry_later(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Fail the first attempt; with a backoff, the sweeper publishes the retry."""
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"attempt": ctx.attempt}


@job_handler("LANE_DEAD", topic=LANE)
def lane_dead(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Dead-letter the first attempt (a replay then publishes it again); succeed after."""
    if ctx.attempt == 1:
        raise PermanentError("dead at once")
    return {"attempt": ctx.attempt}
