"""Job types used by the tests, loaded the way users load theirs: JOBS_HANDLER_MODULES."""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.errors import PermanentError
from common.handlers import JobContext, job_handler


class EchoPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(max_length=1000)


@job_handler("ECHO", payload_model=EchoPayload)
def echo(payload: EchoPayload, ctx: JobContext) -> dict[str, Any]:
    """Return the message (and the attempt it ran in)."""
    return {"echo": payload.message, "attempt": ctx.attempt}


@job_handler("NOOP")
def noop(payload: dict[str, Any]) -> None:
    """Do nothing: measures the system's own overhead."""
    return None


@job_handler("FLAKY", backoff_base_seconds=0)
def flaky(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Fail the first `failures` attempts, then succeed."""
    if ctx.attempt <= int(payload.get("failures", 2)):
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return {"succeeded_on_attempt": ctx.attempt}


@job_handler("ALWAYS_FAIL", backoff_base_seconds=0)
def always_fail(payload: dict[str, Any], ctx: JobContext) -> None:
    """Raise on every attempt."""
    raise RuntimeError(f"always fails (attempt {ctx.attempt})")


@job_handler("PERMANENT_FAIL")
def permanent_fail(payload: dict[str, Any]) -> None:
    """Raise a permanent error: no retry."""
    raise PermanentError("this input can never work")


@job_handler("SLOW", timeout_seconds=1.0, backoff_base_seconds=0)
def slow(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Run `seconds` cooperatively (checking ctx.should_stop), past the 1 s limit if asked."""
    deadline = time.monotonic() + float(payload.get("seconds", 0.1))
    stopped = threading.Event()
    while time.monotonic() < deadline:
        if ctx.should_stop():
            stopped.set()
            break
        time.sleep(0.01)
    return {"stopped": stopped.is_set()}


@job_handler("SLEEPY", timeout_seconds=30)
def sleepy(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Work for `seconds` (cooperatively), then succeed: a job long enough to crash under."""
    deadline = time.monotonic() + float(payload.get("seconds", 1.0))
    while time.monotonic() < deadline:
        if ctx.should_stop():
            raise RuntimeError("stopped before finishing")
        time.sleep(0.02)
    return {"slept": payload.get("seconds", 1.0), "attempt": ctx.attempt}


@job_handler("HANG", timeout_seconds=1.0, backoff_base_seconds=0)
def hang(payload: dict[str, Any]) -> None:
    """Ignore every stop request and block far past the time limit."""
    time.sleep(float(payload.get("seconds", 20)))


@job_handler("PROGRESS", timeout_seconds=30)
def progress(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Report progress in `steps` steps of `step_seconds`, stopping early when asked."""
    steps = int(payload.get("steps", 5))
    for step in range(steps):
        if ctx.should_stop():
            raise RuntimeError(f"stopped at step {step}")
        ctx.progress(step / steps, f"step {step + 1} of {steps}")
        time.sleep(float(payload.get("step_seconds", 0.3)))
    ctx.progress(1.0, "done")
    return {"steps": steps}


@job_handler("ONE_AT_A_TIME", concurrency=1, timeout_seconds=30)
def one_at_a_time(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Sleep a little; the type allows one running attempt across all workers."""
    time.sleep(float(payload.get("seconds", 0.3)))
    return {"attempt": ctx.attempt}


@job_handler("TRACKED", timeout_seconds=30)
def tracked(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Record when this attempt ran, in which process, to a file shared by every worker
    (payload `log`), so a test can check that two attempts of a job never ran at once."""
    import os

    def note(what: str) -> None:
        line = f"{ctx.job_id} {ctx.attempt} {os.getpid()} {what} {time.time():.6f}\n"
        with open(payload["log"], "a") as log:  # one short append: written whole
            log.write(line)

    note("start")
    time.sleep(float(payload.get("seconds", 0.05)))
    note("end")
    return {"pid": os.getpid()}


@job_handler("RATE_LIMITED", rate_limit="5/s", timeout_seconds=30)
def rate_limited(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Do nothing; the type may start 5 attempts a second across all workers."""
    return {"attempt": ctx.attempt}


@job_handler("RATE_AND_CONCURRENCY", rate_limit="4/s", concurrency=1, timeout_seconds=30)
def rate_and_concurrency(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Sleep a little; 4 starts a second and one running attempt, across all workers.
    Returns when the handler itself ran (the attempt rows' times are their transactions')."""
    started = time.time()
    time.sleep(float(payload.get("seconds", 0.1)))
    return {"attempt": ctx.attempt, "ran": [started, time.time()]}


@job_handler("PARENTS")
def parents(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Return the results of the jobs this one depends on (`ctx.parent_results`)."""
    return {"parents": ctx.parent_results}


@job_handler("BIG_RESULT")
def big_result(payload: dict[str, Any]) -> Any:
    """Return `bytes` characters (or, with `"kind": "set"`, something that is not JSON)."""
    if payload.get("kind") == "set":
        return {1, 2, 3}
    return "x" * int(payload.get("bytes", 10))
