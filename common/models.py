"""Public data shapes: what the API accepts and answers, and what travels on Kafka."""

from __future__ import annotations

import re
import urllib.parse
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, field_validator


class JobStatus(str, Enum):
    """Where a job is in its life. The allowed moves are in `common.lifecycle.TRANSITIONS`."""

    WAITING = "WAITING"
    """Set by submit for a job with parents (`depends_on`) that have not all completed.
    Left for QUEUED when the last parent completes, or for CANCELLED when one ends
    DEAD_LETTER or CANCELLED (`cancelled_by` names it)."""

    QUEUED = "QUEUED"
    """Set by submit (and by replay of a dead letter); left when `process` claims the job."""

    IN_PROGRESS = "IN_PROGRESS"
    """Set by `process` when it claims the job and counts the attempt; left when the
    handler returns (COMPLETED), raises (FAILED), or the lease expires (the sweeper
    marks the attempt FAILED)."""

    COMPLETED = "COMPLETED"
    """Set by `process` after the handler returned; terminal."""

    FAILED = "FAILED"
    """Set by `process` when an attempt failed; left at once for RETRYING (retries left)
    or DEAD_LETTER (budget spent or permanent error)."""

    RETRYING = "RETRYING"
    """Set by `process` after a failed attempt with retries left; `next_attempt_at` says
    when the sweeper (or `process` itself, for no delay) re-enqueues it. Left when
    `process` claims it again."""

    DEAD_LETTER = "DEAD_LETTER"
    """Set by `process` when retries are exhausted or the error is permanent; the job is
    then on the `job-dlq` topic and in `GET /dead-letters`. Left only by replay (QUEUED)."""

    CANCELLED = "CANCELLED"
    """Set by `POST /jobs/{id}/cancel` for a WAITING, QUEUED or RETRYING job (it never runs
    again), by `process` when a running handler stopped after a cancel request, or for a
    waiting job whose parent failed. Final, except that a job cancelled by its parent goes
    back to WAITING when that parent is replayed with `with_dependents=true`."""


MAX_PARENTS = 100
RUN_AT_MIN = datetime(1970, 1, 1, tzinfo=UTC)
RUN_AT_AHEAD = timedelta(days=36525)
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _json_kind(value: Any) -> str:
    return {bool: "boolean", list: "array", dict: "object"}.get(type(value), "value")


class JobSubmission(BaseModel):
    """Body of `POST /jobs`."""

    model_config = ConfigDict(extra="forbid")

    job_type: str = Field(
        min_length=1, max_length=100, description="A registered job type",
        examples=["REPORT_GENERATION"]
    )
    payload: dict[str, Any] = Field(
        default_factory=dict, description="Input of the job, validated by the type's model"
    )
    max_retries: int | None = Field(
        default=None, ge=0, le=100, strict=True,
        description="Retries after the first attempt (default 3)",
    )
    run_at: AwareDatetime | None = Field(
        default=None, description="Do not start before this time (an RFC 3339 date-time"
        " with a UTC offset; from 1970 to 100 years ahead)"
    )
    depends_on: list[UUID | Annotated[StrictInt, Field(ge=0)]] | None = Field(
        default=None, max_length=MAX_PARENTS,
        description="Jobs that must complete first (their ids; in a batch also the index of"
        " an earlier item). The job waits in WAITING until every one has COMPLETED, and is"
        " CANCELLED if one ends DEAD_LETTER or CANCELLED.")
    callback_url: str | None = Field(
        default=None, min_length=1, max_length=2000,
        description="POSTed a signed CloudEvent when the job ends (COMPLETED, DEAD_LETTER,"
        " CANCELLED); its host must be in JOBS_CALLBACK_ALLOWED_HOSTS")

    @field_validator("run_at", mode="before")
    @classmethod
    def _run_at_is_text(cls, value: Any) -> Any:
        # Pydantic would read a number (or a string of digits) as Unix time: seconds or
        # milliseconds would be a guess.
        if value is not None and not isinstance(value, datetime) and (
                not isinstance(value, str) or _NUMBER.fullmatch(value)):
            what = "a number" if isinstance(value, int | float | str) \
                and not isinstance(value, bool) else f"a JSON {_json_kind(value)}"
            raise ValueError("must be an RFC 3339 date-time string with a UTC offset"
                             f" (2030-01-01T09:00:00Z), not {what}")
        return value

    @field_validator("run_at")
    @classmethod
    def _run_at_in_range(cls, value: datetime | None) -> datetime | None:
        # "9999-12-31T23:59:59-14:00" is past year 9999 in UTC: PostgreSQL stores it, but
        # it then reads back as text and breaks every listing that holds the job.
        if value is None:
            return None
        try:
            utc = value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range once converted to UTC") from None
        if utc < RUN_AT_MIN or utc > datetime.now(UTC) + RUN_AT_AHEAD:
            raise ValueError("must be between 1970-01-01T00:00:00Z and 100 years from now")
        return utc


class AttemptRecord(BaseModel):
    """One run of a job's handler."""

    attempt: int
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str | None = Field(
        None, description="COMPLETED, FAILED, CANCELLED, or null while running")
    error: str | None = None


def shown_url(url: str | None) -> str | None:
    """A callback URL as any reader of the job sees it: its origin, then `/…` for a path
    or query, which may hold a secret (webhook URLs often do); only the sender uses it all."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return origin + ("/…" if url[len(origin):] not in ("", "/") else "/")


class JobDocument(BaseModel):
    """A job as the API shows it."""

    job_id: UUID
    job_type: str
    status: JobStatus
    retries: int = Field(description="Retry attempts made so far")
    max_retries: int
    attempts: int = Field(description="Attempts started so far, first one included")
    payload: dict[str, Any]
    result: Any | None = None
    error_message: str | None = None
    next_attempt_at: datetime | None = None
    run_at: datetime | None = Field(None, description="Earliest start asked for at submit")
    progress: float | None = Field(None, ge=0, le=1, description="Reported by the handler")
    progress_message: str | None = None
    cancel_requested: bool = Field(False, description="A cancel was asked while it ran")
    submitted_by: str | None = Field(None, description="Name of the token that submitted it")
    depends_on: list[UUID] = Field(default_factory=list,
                                   description="Parents: jobs that had to complete first")
    cancelled_by: UUID | None = Field(
        None, description="The parent whose failure cancelled this job")
    callback_url: str | None = Field(
        None, description="Where the job's end is POSTed: its origin only, then `/…` for a"
        " path or query (which may hold a secret; only the sender uses the whole URL)",
        examples=["https://hooks.example.com/…"])
    created_at: datetime
    updated_at: datetime
    version: int = Field(description="Increases on every change; orders cache writes")


class JobPage(BaseModel):
    """A page of `GET /jobs`."""

    items: list[JobDocument]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page")


class DeadLetter(BaseModel):
    """A job (or an undeliverable record) parked on the dead-letter queue."""

    dead_letter_id: str
    job_id: UUID | None
    job_type: str | None
    reason: str
    last_error: str | None
    attempts: int
    history: list[AttemptRecord] = Field(default_factory=list)
    dead_lettered_at: datetime
    replayed_at: datetime | None = None


class DeadLetterPage(BaseModel):
    """A page of `GET /dead-letters`."""

    items: list[DeadLetter]
    next_cursor: str | None = None


class AttemptPage(BaseModel):
    """`GET /jobs/{id}/attempts`: every attempt, oldest first."""

    items: list[AttemptRecord]


class BatchAccepted(BaseModel):
    """Answer of `POST /jobs/batch`: the documents in the order submitted."""

    jobs: list[JobDocument]


class MinuteCounts(BaseModel):
    """Attempts that ended in one minute."""

    minute: datetime
    completed: int
    failed: int
    cancelled: int = Field(0, description="Attempts stopped by a cancel request")


class Stats(BaseModel):
    """`GET /stats`: what the dashboard shows."""

    counts: dict[str, int] = Field(description="Jobs per status")
    by_type: dict[str, dict[str, int]] = Field(description="Jobs per type and status")
    throughput: list[MinuteCounts] = Field(description="Attempts ended per minute, 15 minutes")
    recent: list[JobDocument]
    running: list[JobDocument]


class TokenRequest(BaseModel):
    """Body of `POST /tokens`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["reporting-service"])
    scopes: list[Literal["jobs:submit", "jobs:read", "jobs:operate", "admin"]] = Field(
        min_length=1, examples=[["jobs:submit", "jobs:read"]])
    expires_at: AwareDatetime | None = Field(None, description="No use after this time")


class TokenInfo(BaseModel):
    """A token as listed: never its secret."""

    id: UUID
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None


class TokenCreated(TokenInfo):
    """A new token: `token` is the secret, shown this once and stored only as a hash."""

    token: str


class TokenPage(BaseModel):
    """`GET /tokens`."""

    items: list[TokenInfo]


class Identity(BaseModel):
    """`GET /whoami`: the token the request carried."""

    name: str
    scopes: list[str]


class Health(BaseModel):
    """`GET /healthz`."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """`GET /readyz`: each dependency's state."""

    ready: bool
    checks: dict[str, dict[str, Any]]


class Problem(BaseModel):
    """An error answer (RFC 9457, `application/problem+json`)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class JobMessage(BaseModel):
    """Data of the CloudEvent on `job-queue`: enough to find the job in PostgreSQL."""

    job_id: UUID
    job_type: str


class CallbackAttempt(BaseModel):
    """One try at delivering a callback."""

    attempt: int
    started_at: datetime
    duration_ms: float
    status_code: int | None = Field(None, description="The receiver's answer, if any")
    error: str | None = None


class CallbackDelivery(BaseModel):
    """A completion event for a job's `callback_url`, and every try at delivering it."""

    callback_id: UUID = Field(description="Also the CloudEvent's `id`")
    event_type: str = Field(examples=["jobs.job.completed"])
    url: str = Field(description="Its origin, then `/…` for a path or query (as the job's"
                     " `callback_url`)", examples=["https://hooks.example.com/…"])
    state: Literal["PENDING", "DELIVERED", "FAILED"]
    attempts: list[CallbackAttempt]
    next_attempt_at: datetime | None = Field(None, description="While PENDING")
    created_at: datetime
    delivered_at: datetime | None = None


class CallbackPage(BaseModel):
    """`GET /jobs/{id}/callbacks`: oldest first."""

    items: list[CallbackDelivery]
