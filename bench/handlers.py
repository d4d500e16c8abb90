"""Job types of the benchmark, loaded by our stack through JOBS_HANDLER_MODULES.

NOOP measures the system's own overhead; ALWAYS_FAIL exercises the failure path with
3 retries and zero backoff (the peers are configured the same way, see bench/peers/).
"""

from __future__ import annotations

from typing import Any

from common.handlers import JobContext, job_handler


@job_handler("NOOP")
def noop(payload: dict[str, Any]) -> None:
    """Do nothing: measures the system's own overhead."""
    return None


@job_handler("ALWAYS_FAIL", max_retries=3, backoff_base_seconds=0, backoff_max_seconds=0)
def always_fail(payload: dict[str, Any], ctx: JobContext) -> None:
    """Raise on every attempt: 1 attempt + 3 retries, no backoff, then DEAD_LETTER."""
    raise RuntimeError(f"always fails (attempt {ctx.attempt})")
