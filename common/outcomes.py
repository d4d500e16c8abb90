"""Recording how attempts ended: COMPLETED, RETRYING, DEAD_LETTER or CANCELLED.

Used by `process` (`OutcomeRecorder`, for the attempts it ran) and by the sweeper
(`record_failure`, for attempts whose worker died).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from common import jobs
from common.db import Connection, Database, GroupCommitter, rows_as_dicts
from common.deadletters import record_dead_letter
from common.errors import HandlerTimeout, PermanentError, RetryableError, ServiceUnavailable
from common.handlers import JobContext, JobType
from common.lifecycle import transition, transition_many_sql
from common.logs import job_context
from common.models import JobStatus
from common.queue import DEAD_LETTER_EVENT_TYPE, Event, Publisher, job_event, job_topic
from common.retry import RetryPolicy
from common.settings import Settings

log = logging.getLogger(__name__)
S = JobStatus
T = TypeVar("T")
MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery, as `process` reports it."""

    job_id: str
    outcome: str  # completed | retrying | dead_lettered | cancelled | deferred | ignored
    status: str | None
    detail: str = ""


@dataclass
class Attempt:
    """A claimed job's attempt, from its handler's start to its outcome."""

    row: dict[str, Any]
    jt: JobType | None
    ctx: JobContext
    started: float
    deadline: float
    timeout: float
    future: concurrent.futures.Future[Any] | None = None
    result: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0

    @property
    def job_id(self) -> str:
        return str(self.row["job_id"])


def policy_for(settings: Settings, jt: JobType | None) -> RetryPolicy:
    """The retry policy of a job type: its own settings where given, else the global ones."""
    return RetryPolicy(
        max_retries=settings.max_retries,
        base_seconds=pick(jt.backoff_base_seconds if jt else None,
                          settings.backoff_base_seconds),
        max_seconds=pick(jt.backoff_max_seconds if jt else None, settings.backoff_max_seconds),
        jitter=settings.backoff_jitter,
    )


def pick(value: float | None, default: float) -> float:
    return default if value is None else value


class OutcomeRecorder:
    """Writes the outcomes of attempts that ran in this process, many per statement, and
    puts on the queue what follows at once (dead letters, retries without backoff)."""

    def __init__(self, settings: Settings, db: Database, publisher: Publisher,
                 marks: jobs.PublishMarks) -> None:
        self.settings = settings
        self.db = db
        self.publisher = publisher
        self.marks = marks
        self.writer = GroupCommitter(db)
        # Through a PostgreSQL outage: the handler's work is done and should not be thrown
        # away (nor the job dead-lettered) for an outage.
        self.outage = RetryPolicy(base_seconds=settings.outcome_retry_base_seconds,
                                  max_seconds=settings.outcome_retry_max_seconds)

    def record(self, write: Callable[[], T]) -> T:
        """Run an outcome write, again with backoff while PostgreSQL is unavailable, for
        up to JOBS_OUTCOME_PATIENCE_SECONDS."""
        retrying = self.outage.retrying(
            retry=tenacity.retry_if_exception_type(ServiceUnavailable),
            patience=self.settings.outcome_patience_seconds, what="recording an outcome")
        return retrying(write)

    def complete(self, done: list[Attempt], rows: list[dict[str, Any]]) -> dict[str, Outcome]:
        sql, params = jobs.complete_many_sql(sorted(
            ((a.job_id, a.ctx.attempt, a.result) for a in done), key=lambda d: d[0]))
        moved = {str(row["job_id"]): row for row in self.record(
            lambda: self.writer.run(sql, **params))}
        rows.extend(moved.values())
        outcomes = {}
        for attempt in done:
            row = moved.get(attempt.job_id)
            if row is None:
                outcomes[attempt.job_id] = fenced(attempt.job_id, attempt.ctx.attempt)
                continue
            with job_context_of(row):
                log.info("job %s attempt %d completed in %.3fs", attempt.job_id,
                         attempt.ctx.attempt, attempt.elapsed)
            outcomes[attempt.job_id] = Outcome(attempt.job_id, "completed", row["status"])
        return outcomes

    def cancelled(self, attempt: Attempt, rows: list[dict[str, Any]]) -> Outcome:
        job_id, number = attempt.job_id, attempt.ctx.attempt
        message = describe(attempt.error) if attempt.error else "cancelled"

        def write() -> dict[str, Any] | None:
            with self.db.transaction() as conn:
                row = transition(conn, job_id, S.CANCELLED, sources=[S.IN_PROGRESS],
                                 attempt=number, values={"lease_expires_at": None,
                                                         "error_message": message})
                if row is not None:
                    jobs.finish_attempt(conn, job_id, number, S.CANCELLED.value, message)
                return row

        row = self.record(write)
        if row is None:
            return fenced(job_id, number)
        rows.append(row)
        with job_context_of(row):
            log.info("job %s attempt %d stopped after a cancel request", job_id, number)
        return Outcome(job_id, "cancelled", row["status"], message)

    def fail(self, failed: list[Attempt], rows: list[dict[str, Any]]) -> dict[str, Outcome]:
        """Record failed attempts (one transaction for all): RETRYING or DEAD_LETTER each;
        then dead letters go to the DLQ topic and zero-backoff retries to the queue."""
        plans = []
        for attempt in failed:
            error = attempt.error
            assert error is not None
            plans.append(Failure(
                attempt.job_id, attempt.ctx.attempt, describe(error),
                policy_for(self.settings, attempt.jt), isinstance(error, PermanentError),
                error.delay if isinstance(error, RetryableError) else None))

        def write(conn: Connection) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
            return record_failures(conn, plans)

        recorded = self.record(lambda: self.writer.call(write))
        outcomes = {}
        dead_letters, requeue = [], []
        for plan, (row, dead_letter) in zip(plans, recorded, strict=True):
            job_id, message = plan.job_id, plan.message
            if row is None:
                outcomes[job_id] = fenced(job_id, plan.attempt)
                continue
            rows.append(row)
            with job_context_of(row):
                log.warning("job %s attempt %d failed: %s -> %s", job_id, plan.attempt, message,
                            row["status"])
            if dead_letter is not None:
                dead_letters.append(dead_letter)
                outcomes[job_id] = Outcome(job_id, "dead_lettered", row["status"], message)
                continue
            if plan.policy.base_seconds == 0 and not plan.delay_floor:
                # No backoff: hand the retry to the queue now, not at the sweeper's next tick.
                requeue.append(row)
            outcomes[job_id] = Outcome(job_id, "retrying", row["status"], message)
        if dead_letters:
            publish_dead_letters(self.publisher, self.settings, dead_letters)
        if requeue:
            self._requeue(requeue)
        return outcomes

    def _requeue(self, rows: list[dict[str, Any]]) -> None:
        events = [job_event(job_topic(self.settings, row["job_type"]), str(row["job_id"]),
                            row["job_type"],
                            ce_id=f"{row['job_id']}:retry-{row['retries'] + 1}",
                            source="/jobs/process") for row in rows]
        try:
            self.publisher.publish(events)
            self.marks.add([(str(row["job_id"]), row["attempts"]) for row in rows])
        except Exception as exc:  # the sweeper publishes them later from PostgreSQL
            log.warning("could not requeue %d job(s) now (%s); the sweeper will", len(rows), exc)


def fenced(job_id: str, attempt: int) -> Outcome:
    log.warning("job %s attempt %d lost its lease; its outcome was not recorded",
                job_id, attempt)
    return Outcome(job_id, "ignored", None, "attempt no longer owns the job")


def describe(error: BaseException) -> str:
    """`Type: message` of an exception, bounded in size."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if not isinstance(error, HandlerTimeout | PermanentError | RetryableError):
        tb = error.__traceback__  # the innermost frame, without reading source files
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            text += f" (at {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
    return text[:MAX_ERROR_CHARS]


@dataclass(frozen=True)
class Failure:
    """A failed attempt to record: what went wrong, and the job's retry policy."""

    job_id: str
    attempt: int
    message: str
    policy: RetryPolicy
    permanent: bool = False
    delay_floor: float | None = None


def record_failure(
    conn: Connection, job_id: str, attempt: int, message: str, policy: RetryPolicy, *,
    permanent: bool = False, delay_floor: float | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """IN_PROGRESS -> FAILED for `attempt`, then RETRYING or DEAD_LETTER.

    Returns (new row, dead letter or None); (None, None) if the attempt no longer
    owns the job. Runs inside the caller's transaction.
    """
    return record_failures(conn, [Failure(job_id, attempt, message, policy, permanent,
                                          delay_floor)])[0]


def record_failures(conn: Connection, failures: list[Failure]
                    ) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """`record_failure` for many attempts in a few statements, whatever their number (one
    per step of the graph, plus a dead-letter row each). Answers in the order given."""
    if not failures:
        return []
    ordered = sorted(failures, key=lambda f: f.job_id)  # concurrent writers lock in one order
    sql, params = transition_many_sql(
        S.FAILED, {"id": [f.job_id for f in ordered], "attempt": [f.attempt for f in ordered],
                   "message": [f.message for f in ordered]},
        sources=[S.IN_PROGRESS], values={"error_message": "message"},
        expressions={"lease_expires_at": "NULL"})
    failed = {str(row["job_id"]): row for row in rows_as_dicts(conn, conn.run(sql, **params))}
    owned = [f for f in ordered if f.job_id in failed]
    if not owned:
        return [(None, None)] * len(failures)
    conn.run("UPDATE job_attempts SET finished_at = now(), outcome = 'FAILED', error = r.e"
             " FROM unnest(CAST(:ids AS uuid[]), CAST(:ns AS int[]), CAST(:es AS text[]))"
             " AS r(id, n, e) WHERE job_attempts.job_id = r.id AND job_attempts.attempt = r.n",
             ids=[f.job_id for f in owned], ns=[f.attempt for f in owned],
             es=[f.message for f in owned])
    dead = [f for f in owned if f.permanent or f.policy.exhausted(
        failed[f.job_id]["retries"], failed[f.job_id]["max_retries"])]
    retry = [f for f in owned if f not in dead]
    results: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {}
    if dead:
        sql, params = transition_many_sql(S.DEAD_LETTER, {"id": [f.job_id for f in dead]},
                                          sources=[S.FAILED])
        moved = {str(r["job_id"]): r for r in rows_as_dicts(conn, conn.run(sql, **params))}
        for f in dead:
            row = moved[f.job_id]  # same transaction: nobody else can have moved it
            reason = "permanent error" if f.permanent else "retries exhausted"
            results[f.job_id] = (row, record_dead_letter(conn, row, reason, f.message))
    if retry:
        sql, params = transition_many_sql(
            S.RETRYING, {"id": [f.job_id for f in retry], "delay": [
                f.policy.delay(failed[f.job_id]["retries"], f.delay_floor) for f in retry]},
            sources=[S.FAILED],
            expressions={"next_attempt_at": "now() + make_interval(secs => r.r_delay)",
                         "published_at": "NULL"})
        for row in rows_as_dicts(conn, conn.run(sql, **params)):
            results[str(row["job_id"])] = (row, None)
    return [results.get(f.job_id, (None, None)) for f in failures]


def publish_dead_letters(publisher: Publisher, settings: Settings,
                         dead_letters: list[dict[str, Any]]) -> None:
    """Put dead letters on the DLQ topic; their rows are already committed with the jobs."""
    events = [Event(
        topic=settings.dlq_topic,
        key=str(dead_letter["job_id"]),
        ce_id=dead_letter["dead_letter_id"],
        ce_type=DEAD_LETTER_EVENT_TYPE,
        ce_source="/jobs/process",
        data=dead_letter,
    ) for dead_letter in dead_letters]
    try:
        publisher.publish(events)
    except Exception as exc:
        log.error("dead letter(s) %s recorded but not published to %s: %s",
                  ", ".join(d["dead_letter_id"] for d in dead_letters), settings.dlq_topic, exc)


@contextlib.contextmanager
def job_context_of(row: dict[str, Any]) -> Iterator[None]:
    """Log lines within name the job and attempt of `row`."""
    token = job_context.set({"job_id": str(row["job_id"]), "attempt": row["attempts"],
                             "job_type": row["job_type"]})
    try:
        yield
    finally:
        job_context.reset(token)
