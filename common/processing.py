"""Running one job message: claim, run the handler under its time limit, record the outcome."""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from common import jobs, metrics
from common.cache import StatusCache
from common.db import Connection, Database, GroupCommitter
from common.deadletters import record_dead_letter
from common.errors import HandlerTimeout, PermanentError, RetryableError, ServiceUnavailable
from common.handlers import JobContext, JobType, get_job_type, parse_or_permanent
from common.lifecycle import transition
from common.logs import job_context
from common.models import JobMessage, JobStatus
from common.queue import DEAD_LETTER_EVENT_TYPE, Event, Publisher, job_event
from common.retry import RetryPolicy
from common.settings import Settings

log = logging.getLogger(__name__)
S = JobStatus
T = TypeVar("T")
MAX_ERROR_CHARS = 4000


class PoisonMessage(ValueError):
    """A record no attempt can ever process (not JSON, no job id, unknown job)."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery, as `process` reports it."""

    job_id: str
    outcome: str  # completed | retrying | dead_lettered | ignored
    status: str | None
    detail: str = ""


def parse_message(data: Any) -> JobMessage:
    """The job message in a CloudEvent's data, or PoisonMessage saying what is wrong."""
    if isinstance(data, bytes | str):
        raise PoisonMessage("event data is not a JSON object")
    try:
        return JobMessage.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) or "data" for e in exc.errors())
        raise PoisonMessage(f"event data is not a job message (bad or missing: {fields})") from exc


def policy_for(settings: Settings, jt: JobType | None) -> RetryPolicy:
    """The retry policy of a job type: its own settings where given, else the global ones."""
    return RetryPolicy(
        max_retries=settings.max_retries,
        base_seconds=_pick(jt.backoff_base_seconds if jt else None,
                           settings.backoff_base_seconds),
        max_seconds=_pick(jt.backoff_max_seconds if jt else None, settings.backoff_max_seconds),
        jitter=settings.backoff_jitter,
    )


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


class Processor:
    """Executes job messages; one per process, shared by the request threads."""

    def __init__(self, settings: Settings, db: Database, cache: StatusCache,
                 publisher: Publisher, max_workers: int = 64) -> None:
        self.settings = settings
        self.db = db
        self.cache = cache
        self.publisher = publisher
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="handler")
        # job id -> (attempt, context) of this process's running attempts, for the heartbeat
        self._running: dict[str, tuple[int, JobContext]] = {}
        self._running_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self.outcome_patience = 300.0  # how long to keep trying to record an outcome
        self.writer = GroupCommitter(db)
        self.marks = jobs.PublishMarks(db)

    # -- leases ----------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        with self._running_lock:
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(target=self._beat, name="lease-heartbeat",
                                                   daemon=True)
                self._heartbeat.start()

    def _beat(self) -> None:
        """Extend the leases of this process's running attempts, and pass cancel requests
        on to their handlers. A dead or frozen process stops beating, and the sweeper takes
        its jobs back once their lease runs out."""
        renew_every = self.settings.lease_seconds / 3
        last_renewal = time.monotonic()
        while True:
            time.sleep(min(1.0, renew_every))
            with self._running_lock:
                running = dict(self._running)
            if not running:
                continue
            renew = time.monotonic() - last_renewal >= renew_every
            try:
                rows = self.db.run(
                    "UPDATE jobs SET lease_expires_at = CASE WHEN :renew THEN"
                    " now() + make_interval(secs => :lease) ELSE lease_expires_at END"
                    " FROM unnest(CAST(:ids AS uuid[]), CAST(:ns AS int[])) AS r(id, n)"
                    " WHERE jobs.job_id = r.id AND jobs.attempts = r.n"
                    " AND jobs.status = 'IN_PROGRESS'"
                    " AND (:renew OR jobs.cancel_requested_at IS NOT NULL)"
                    " RETURNING jobs.job_id::text, jobs.cancel_requested_at IS NOT NULL",
                    renew=renew, lease=self.settings.lease_seconds, ids=list(running),
                    ns=[attempt for attempt, _ in running.values()])
            except Exception as exc:  # PostgreSQL down: the outcome writer retries anyway
                log.warning("lease heartbeat failed: %s", exc)
                continue
            if renew:
                last_renewal = time.monotonic()
            for job_id, cancel in rows:
                if cancel and job_id in running:
                    running[job_id][1].request_stop("cancelled")

    def _record(self, write: Callable[[], T]) -> T:
        """Run an outcome write, retrying through a PostgreSQL outage: the handler's work
        is done and should not be thrown away (nor the job dead-lettered) for an outage."""
        deadline = time.monotonic() + self.outcome_patience
        delay = 0.1
        while True:
            try:
                return write()
            except ServiceUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("cannot record the outcome yet (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def handle(self, message: JobMessage) -> Outcome:
        """Process one delivery of `message`; safe to call twice for the same message."""
        job_id = str(message.job_id)
        self._start_heartbeat()
        declared = get_job_type(message.job_type)
        limit = (message.job_type, declared.concurrency) if declared and declared.concurrency \
            else None
        if limit is None:
            # The common case: one statement, committed together with concurrent claims.
            sql, params = jobs.claim_sql(job_id, self.settings.lease_seconds)
            claimed = self.writer.run(sql, **params)
            row = claimed[0] if claimed else None
            current = row
            if row is None:
                with self.db.connection() as conn:
                    current = jobs.get_job(conn, job_id)
        else:
            with self.db.transaction() as conn:
                row = jobs.claim(conn, job_id, self.settings.lease_seconds, concurrency=limit)
                current = row or jobs.get_job(conn, job_id)
        if current is None:
            raise PoisonMessage(f"no job {job_id} in PostgreSQL")
        if row is None and limit and current["status"] in ("QUEUED", "RETRYING"):
            log.info("job %s waits: %s already runs %d at once", job_id, *limit)
            return Outcome(job_id, "deferred", current["status"], "type at its concurrency limit")
        if row is None:
            # A duplicate or late delivery: the job is already further along.
            log.info("job %s is %s; delivery ignored", job_id, current["status"])
            return Outcome(job_id, "ignored", current["status"], "job is not waiting to run")
        self._cache([row])
        attempt = row["attempts"]
        token = job_context.set({"job_id": job_id, "attempt": attempt,
                                 "job_type": row["job_type"]})
        ctx = JobContext(
            job_id=row["job_id"], job_type=row["job_type"], attempt=attempt,
            retries=row["retries"], artifact_dir=self.settings.artifact_dir,
            progress_sink=lambda fraction, text: self._progress(job_id, attempt, fraction, text),
        )
        with self._running_lock:
            self._running[job_id] = (attempt, ctx)
        try:
            return self._attempt(row, ctx)
        finally:
            with self._running_lock:
                self._running.pop(job_id, None)
            job_context.reset(token)

    def _cache(self, rows: list[dict[str, Any]]) -> None:
        jobs.cache_rows(self.db, self.cache, rows)

    def _progress(self, job_id: str, attempt: int, fraction: float, text: str | None) -> None:
        try:
            with self.db.transaction() as conn:
                row = jobs.record_progress(conn, job_id, attempt, fraction, text)
        except ServiceUnavailable as exc:  # progress is best effort; the outcome is not
            log.warning("progress of job %s not recorded: %s", job_id, exc)
            return
        if row is not None:
            self._cache([row])

    def _attempt(self, row: dict[str, Any], ctx: JobContext) -> Outcome:
        job_id, attempt = str(row["job_id"]), row["attempts"]
        jt = get_job_type(row["job_type"])  # the job's own type, whatever the message said
        timeout = _pick(jt.timeout_seconds if jt else None, self.settings.handler_timeout_seconds)
        log.info("job %s attempt %d started (%s)", job_id, attempt, row["job_type"])

        error: BaseException | None = None
        result: Any = None
        started = time.monotonic()
        try:
            if jt is None:
                raise PermanentError(f"no handler for job type {row['job_type']!r} in this worker")
            result = self._run(jt, row, ctx, timeout)
        except Exception as exc:  # every handler failure is an attempt outcome
            error = exc
        elapsed = time.monotonic() - started
        if error is None:
            outcome = self._complete(job_id, attempt, result)
        elif ctx.stop_reason == "cancelled":
            outcome = self._cancelled(job_id, attempt, describe(error))
        else:
            outcome = self._fail(row, jt, attempt, error)
        job_type = row["job_type"]
        metrics.ATTEMPT_SECONDS.labels(job_type, outcome.outcome).observe(elapsed)
        counter = {"completed": metrics.COMPLETED, "dead_lettered": metrics.DEAD_LETTERED,
                   "cancelled": metrics.CANCELLED}.get(outcome.outcome)
        if counter is not None:
            counter.labels(job_type).inc()
        if error is not None and outcome.outcome in ("retrying", "dead_lettered"):
            metrics.FAILED.labels(job_type).inc()
        return outcome

    def _cancelled(self, job_id: str, attempt: int, message: str) -> Outcome:
        def write() -> dict[str, Any] | None:
            with self.db.transaction() as conn:
                row = transition(conn, job_id, S.CANCELLED, sources=[S.IN_PROGRESS],
                                 attempt=attempt, values={"lease_expires_at": None,
                                                          "error_message": message})
                if row is not None:
                    jobs.finish_attempt(conn, job_id, attempt, S.CANCELLED.value, message)
                return row

        row = self._record(write)
        if row is None:
            return self._fenced(job_id, attempt)
        self._cache([row])
        log.info("job %s attempt %d stopped after a cancel request", job_id, attempt)
        return Outcome(job_id, "cancelled", row["status"], message)

    def _run(self, jt: JobType, row: dict[str, Any], ctx: JobContext, timeout: float) -> Any:
        payload = parse_or_permanent(jt, jobs.json_value(row["payload_json"]))
        # copy_context: the handler's own log lines carry the job id and attempt too
        future = self._executor.submit(contextvars.copy_context().run, jt.run, payload, ctx)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            # Threads cannot be killed: tell the handler to stop, and fence its late result
            # out by the attempt number.
            ctx.request_stop("timeout")
            raise HandlerTimeout(f"handler ran past its time limit of {timeout:g}s") from None

    def _complete(self, job_id: str, attempt: int, result: Any) -> Outcome:
        sql, params = jobs.complete_sql(job_id, attempt, result)

        def write() -> dict[str, Any] | None:
            rows = self.writer.run(sql, **params)
            return rows[0] if rows else None

        row = self._record(write)
        if row is None:
            return self._fenced(job_id, attempt)
        self._cache([row])
        log.info("job %s attempt %d completed", job_id, attempt)
        return Outcome(job_id, "completed", row["status"])

    def _fail(self, claimed: dict[str, Any], jt: JobType | None, attempt: int,
              error: BaseException) -> Outcome:
        job_id = str(claimed["job_id"])
        message = describe(error)
        policy = policy_for(self.settings, jt)
        delay_floor = error.delay if isinstance(error, RetryableError) else None
        def write() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            return self.writer.call(lambda conn: record_failure(
                conn, job_id, attempt, message, policy,
                permanent=isinstance(error, PermanentError), delay_floor=delay_floor))

        row, dead_letter = self._record(write)
        if row is None:
            return self._fenced(job_id, attempt)
        self._cache([row])
        log.warning("job %s attempt %d failed: %s -> %s", job_id, attempt, message, row["status"])
        if dead_letter is not None:
            publish_dead_letter(self.publisher, self.settings, dead_letter)
            return Outcome(job_id, "dead_lettered", row["status"], message)
        if policy.base_seconds == 0 and not delay_floor:
            # No backoff: hand the retry to the queue now rather than at the sweeper's next tick.
            self._requeue(row)
        return Outcome(job_id, "retrying", row["status"], message)

    def _requeue(self, row: dict[str, Any]) -> None:
        job_id = str(row["job_id"])
        event = job_event(self.settings.queue_topic, job_id, row["job_type"],
                          ce_id=f"{job_id}:retry-{row['retries'] + 1}", source="/jobs/process")
        try:
            self.publisher.publish([event])
            self.marks.add([(job_id, row["attempts"])])
        except Exception as exc:  # the sweeper publishes it later from PostgreSQL
            log.warning("could not requeue job %s now (%s); the sweeper will", job_id, exc)

    def _fenced(self, job_id: str, attempt: int) -> Outcome:
        log.warning("job %s attempt %d lost its lease; its outcome was not recorded",
                    job_id, attempt)
        return Outcome(job_id, "ignored", None, "attempt no longer owns the job")


def describe(error: BaseException) -> str:
    """`Type: message` of an exception, bounded in size."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if not isinstance(error, HandlerTimeout | PermanentError | RetryableError):
        frames = traceback.extract_tb(error.__traceback__)
        if frames:
            last = frames[-1]
            text += f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})"
    return text[:MAX_ERROR_CHARS]


def record_failure(
    conn: Connection, job_id: str, attempt: int, message: str, policy: RetryPolicy, *,
    permanent: bool = False, delay_floor: float | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """IN_PROGRESS -> FAILED for `attempt`, then RETRYING or DEAD_LETTER.

    Returns (new row, dead letter or None); (None, None) if the attempt no longer
    owns the job. Runs inside the caller's transaction.
    """
    failed = transition(conn, job_id, S.FAILED, sources=[S.IN_PROGRESS], attempt=attempt,
                        values={"error_message": message, "lease_expires_at": None})
    if failed is None:
        return None, None
    jobs.finish_attempt(conn, job_id, attempt, S.FAILED.value, message)
    if permanent or policy.exhausted(failed["retries"], failed["max_retries"]):
        row = transition(conn, job_id, S.DEAD_LETTER, sources=[S.FAILED])
        assert row is not None  # same transaction: nobody else can have moved it
        reason = "permanent error" if permanent else "retries exhausted"
        return row, record_dead_letter(conn, row, reason, message)
    delay = policy.delay(failed["retries"], delay_floor)
    row = transition(
        conn, job_id, S.RETRYING, sources=[S.FAILED],
        expressions={"next_attempt_at": "now() + make_interval(secs => :delay)",
                     "published_at": "NULL"},
        params={"delay": delay},
    )
    return row, None


def publish_dead_letter(publisher: Publisher, settings: Settings,
                        dead_letter: dict[str, Any]) -> None:
    """Put a dead letter on the DLQ topic; its row is already committed with the job."""
    event = Event(
        topic=settings.dlq_topic,
        key=str(dead_letter["job_id"]),
        ce_id=dead_letter["dead_letter_id"],
        ce_type=DEAD_LETTER_EVENT_TYPE,
        ce_source="/jobs/process",
        data=dead_letter,
    )
    try:
        publisher.publish([event])
    except Exception as exc:
        log.error("dead letter %s recorded but not published to %s: %s",
                  dead_letter["dead_letter_id"], settings.dlq_topic, exc)
