"""Running one job message: claim, run the handler under its time limit, record the outcome."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from common import jobs, metrics
from common.cache import StatusCache
from common.db import Connection, Database, GroupCommitter, rows_as_dicts
from common.deadletters import record_dead_letter
from common.dependencies import follow_up, parent_results
from common.errors import HandlerTimeout, PermanentError, RetryableError, ServiceUnavailable
from common.handlers import JobContext, JobType, get_job_type, parse_or_permanent
from common.lifecycle import transition, transition_many_sql
from common.logs import job_context
from common.models import JobMessage, JobStatus
from common.queue import DEAD_LETTER_EVENT_TYPE, Event, Publisher, job_event, job_topic
from common.retry import RetryPolicy
from common.settings import Settings

log = logging.getLogger(__name__)
S = JobStatus
T = TypeVar("T")
MAX_ERROR_CHARS = 4000
CLAIM_CACHE_DELAY = 0.02  # seconds: a job done sooner never shows IN_PROGRESS in the cache


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
                 publisher: Publisher, max_workers: int = 256) -> None:
        self.settings = settings
        self.db = db
        self.cache = cache
        self.publisher = publisher
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="handler")
        # job id -> (attempt, context) of this process's running attempts, for the heartbeat
        self._running: dict[str, tuple[int, JobContext]] = {}
        self._running_lock = threading.Lock()
        # job id -> attempt of attempts that just ended, whose IN_PROGRESS need not be cached
        self._done_recently: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._background = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cache-claims")
        # What follows a job's end (its dependents, its callback) on threads of its own: a
        # slow broker while releasing dependents never holds up the claims' cache writes.
        self._follow = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="follow-up")
        # Deliveries of types with a concurrency limit, within a batch (see handle_batch).
        self._solo = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="limited")
        self._heartbeat: threading.Thread | None = None
        self.outcome_patience = 300.0  # how long to keep trying to record an outcome
        self.writer = GroupCommitter(db)
        # Claims commit without waiting for the WAL flush: if PostgreSQL itself crashes
        # within a fraction of a second, the attempt is forgotten and the job runs again
        # (it was never reported done). The outcome's durable commit flushes the claim too.
        self.claims = GroupCommitter(db, durable=False)
        self.marks = jobs.PublishMarks(db)
        # Lease renewals and progress reports on a pool of their own: a handler holding a
        # connection of the main pool (DATA_EXPORT streams inside one) must never wait
        # for another to report progress, and a busy pool must never starve the heartbeat
        # (a missed renewal hands a running job to the sweeper).
        self.beats = Database(db.dsn, size=2, wait=db.wait)

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
                rows = self.beats.run(
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

    def handle_batch(self, messages: list[JobMessage]) -> list[Outcome | PoisonMessage]:
        """Process several deliveries at once, each with the guarantees of `handle`: one
        statement claims them all, their handlers run side by side, one statement records
        the completions (one transaction the failures), one round trip caches each step.
        Answers in the order of `messages`; a PoisonMessage for a job that does not exist."""
        results: list[Outcome | PoisonMessage | None] = [None] * len(messages)
        positions: dict[str, list[int]] = {}  # job id -> where its deliveries are
        limited: list[int] = []
        for i, message in enumerate(messages):
            declared = get_job_type(message.job_type)
            if declared is not None and declared.limited:
                limited.append(i)
            else:
                positions.setdefault(str(message.job_id), []).append(i)
        # Types with a concurrency or rate limit claim one job at a time, meanwhile.
        solo = {i: self._solo.submit(self._handle_limited, messages[i]) for i in limited}
        if positions:
            self._start_heartbeat()
            # Sorted: concurrent multi-row writes lock rows in the same order.
            sql, params = jobs.claim_many_sql(sorted(positions), self.settings.lease_seconds)
            claimed = {str(row["job_id"]): row for row in self.claims.run(sql, **params)}
            current: dict[str, dict[str, Any]] = {}
            if len(claimed) < len(positions):
                with self.db.connection() as conn:
                    current = jobs.get_jobs(conn, [j for j in positions if j not in claimed])
            # IN_PROGRESS reaches the cache meanwhile, a moment later, for the jobs still
            # running then (a short job's outcome is the only write it needs). A versioned
            # write: the outcome's own write wins, whichever lands first.
            self._background.submit(self._cache_running, list(claimed.values()),
                                    time.monotonic() + CLAIM_CACHE_DELAY)
            for job_id, where in positions.items():
                # A job's first delivery runs it; any other is a duplicate, answered as such.
                for i in where[1:] if job_id in claimed else where:
                    results[i] = _not_waiting(job_id, claimed.get(job_id) or current.get(job_id))
            for outcome in self._attempts(list(claimed.values())):
                results[positions[outcome.job_id][0]] = outcome
        for i, future in solo.items():
            try:
                results[i] = future.result()
            except PoisonMessage as exc:
                results[i] = exc
        assert all(r is not None for r in results), "every delivery gets an answer"
        return results  # type: ignore[return-value]

    def _handle_limited(self, message: JobMessage) -> Outcome:
        """A delivery of a type with a concurrency or rate limit: claimed only if a slot of
        each is free, else deferred (no attempt counted) for the sweeper to send again."""
        job_id = str(message.job_id)
        declared = get_job_type(message.job_type)
        assert declared is not None and declared.limited
        self._start_heartbeat()
        with self.db.transaction() as conn:
            row = jobs.claim(
                conn, job_id, self.settings.lease_seconds,
                concurrency=(declared.name, declared.concurrency) if declared.concurrency else None,
                rate=(declared.name, declared.rate_limit) if declared.rate_limit else None)
            current = row or jobs.get_job(conn, job_id)
        if row is None and current is not None and current["status"] in ("QUEUED", "RETRYING"):
            if current["rate_slot_at"] is not None \
                    and current["rate_slot_at"] == current["next_attempt_at"]:
                reason = f"type at its rate limit; its slot is {current['rate_slot_at']}"
            else:
                reason = "type at its concurrency limit"
            log.info("job %s of %s waits: %s", job_id, declared.name, reason)
            return Outcome(job_id, "deferred", current["status"], reason)
        if row is None:
            result = _not_waiting(job_id, current)
            if isinstance(result, PoisonMessage):
                raise result
            return result
        self._cache([row])
        return self._attempts([row])[0]

    def _cache_running(self, rows: list[dict[str, Any]], at: float) -> None:
        time.sleep(max(0.0, at - time.monotonic()))
        with self._running_lock:
            running = [row for row in rows if self._done_recently.pop(str(row["job_id"]), None)
                       != row["attempts"]]
        self._cache(running)

    def _cache(self, rows: list[dict[str, Any]]) -> None:
        jobs.cache_rows(self.db, self.cache, rows)

    def _progress(self, job_id: str, attempt: int, fraction: float, text: str | None) -> None:
        try:
            with self.beats.transaction() as conn:
                row = jobs.record_progress(conn, job_id, attempt, fraction, text)
        except ServiceUnavailable as exc:  # progress is best effort; the outcome is not
            log.warning("progress of job %s not recorded: %s", job_id, exc)
            return
        if row is not None:
            self._cache([row])

    def _start(self, row: dict[str, Any]) -> _Running:
        """Start the handler of a claimed job in the handler pool, under its time limit."""
        job_id, attempt = str(row["job_id"]), row["attempts"]
        jt = get_job_type(row["job_type"])  # the job's own type, whatever the message said
        ctx = JobContext(
            job_id=row["job_id"], job_type=row["job_type"], attempt=attempt,
            retries=row["retries"], artifact_dir=self.settings.artifact_store,
            progress_sink=lambda fraction, text: self._progress(job_id, attempt, fraction, text),
        )
        if row["depends_on"]:
            try:
                ctx.parent_results = parent_results(self.db, row["depends_on"])
            except ServiceUnavailable as exc:
                running = _Running(row, jt, ctx, time.monotonic(), time.monotonic(), 0.0)
                running.error = RetryableError(f"could not read the parents' results: {exc}")
                return running
        with self._running_lock:
            self._running[job_id] = (attempt, ctx)
        timeout = _pick(jt.timeout_seconds if jt else None, self.settings.handler_timeout_seconds)
        running = _Running(row, jt, ctx, time.monotonic(), time.monotonic() + timeout, timeout)
        # The handler's own log lines carry the job id and attempt (a context per job).
        context = contextvars.copy_context()
        context.run(job_context.set, {"job_id": job_id, "attempt": attempt,
                                      "job_type": row["job_type"]})
        try:
            if jt is None:
                raise PermanentError(f"no handler for job type {row['job_type']!r} in this worker")
            payload = parse_or_permanent(jt, row["payload_json"])
            running.future = self._executor.submit(context.run, jt.run, payload, ctx)
        except Exception as exc:
            running.error = exc
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s attempt %d started (%s)", job_id, attempt, row["job_type"])
        return running

    def _finish(self, running: _Running) -> None:
        """Wait for a started handler until its deadline; sets its result or error."""
        if running.future is not None:
            try:
                running.result = running.future.result(
                    timeout=max(0.0, running.deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                # Threads cannot be killed: tell the handler to stop, and fence its late
                # result out by the attempt number.
                running.ctx.request_stop("timeout")
                running.error = HandlerTimeout(
                    f"handler ran past its time limit of {running.timeout:g}s")
            except Exception as exc:  # every handler failure is an attempt outcome
                running.error = exc
            if running.error is None:
                running.error = self._unstorable(running.result)
        running.elapsed = time.monotonic() - running.started
        with self._running_lock:
            job_id = str(running.row["job_id"])
            self._running.pop(job_id, None)
            self._done_recently[job_id] = running.ctx.attempt
            if len(self._done_recently) > 10_000:  # those whose claim was cached already
                self._done_recently.popitem(last=False)

    def _unstorable(self, result: Any) -> PermanentError | None:
        """Why a handler's result cannot be stored as the job's result, or None: not JSON,
        or larger than JOBS_MAX_RESULT_BYTES (it would be copied into every document,
        listing, cache entry and dependent's context)."""
        try:
            size = len(json.dumps(result, allow_nan=False).encode())
        except (TypeError, ValueError) as exc:
            return PermanentError(f"the handler's result is not JSON: {exc}")
        limit = self.settings.max_result_bytes
        if size > limit:
            return PermanentError(f"the handler's result is {size} bytes as JSON, over"
                                  f" JOBS_MAX_RESULT_BYTES ({limit}); store large output as"
                                  " an artifact and return its name")
        return None

    def _attempts(self, claimed: list[dict[str, Any]]) -> list[Outcome]:
        """Run the handlers of claimed jobs and record every outcome; in the same order."""
        started = [self._start(row) for row in claimed]
        for running in started:
            self._finish(running)
        # A cancel request wins whatever the handler did after it: returned or raised.
        cancelled = [r for r in started if r.ctx.stop_reason == "cancelled"]
        done = [r for r in started if r.error is None and r not in cancelled]
        failed = [r for r in started if r.error is not None and r not in cancelled]
        outcomes: dict[str, Outcome] = {}
        rows: list[dict[str, Any]] = []
        if done:
            outcomes.update(self._complete(done, rows))
        for running in cancelled:
            outcomes[str(running.row["job_id"])] = self._cancelled(running, rows)
        if failed:
            outcomes.update(self._fail(failed, rows))
        self._cache(rows)
        followed = [row for row in rows if row["has_dependents"] or row["callback_url"]]
        if followed:  # dependents and callbacks of jobs that ended; the sweeper's otherwise
            self._follow.submit(follow_up, self.db, self.cache, self.publisher,
                                    self.settings, followed)
        for running in started:
            job_type = running.row["job_type"]
            outcome = outcomes[str(running.row["job_id"])]
            metrics.ATTEMPT_SECONDS.labels(job_type, outcome.outcome).observe(running.elapsed)
            counter = {"completed": metrics.COMPLETED, "dead_lettered": metrics.DEAD_LETTERED,
                       "cancelled": metrics.CANCELLED}.get(outcome.outcome)
            if counter is not None:
                counter.labels(job_type).inc()
            if running.error is not None and outcome.outcome in ("retrying", "dead_lettered"):
                metrics.FAILED.labels(job_type).inc()
        return [outcomes[str(r["job_id"])] for r in claimed]

    def _cancelled(self, running: _Running, rows: list[dict[str, Any]]) -> Outcome:
        job_id, attempt = str(running.row["job_id"]), running.ctx.attempt
        message = describe(running.error) if running.error else "cancelled"

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
        rows.append(row)
        with job_context_of(row):
            log.info("job %s attempt %d stopped after a cancel request", job_id, attempt)
        return Outcome(job_id, "cancelled", row["status"], message)

    def _complete(self, done: list[_Running], rows: list[dict[str, Any]]) -> dict[str, Outcome]:
        sql, params = jobs.complete_many_sql(sorted(
            ((str(r.row["job_id"]), r.ctx.attempt, r.result) for r in done), key=lambda d: d[0]))
        moved = {str(row["job_id"]): row for row in self._record(
            lambda: self.writer.run(sql, **params))}
        rows.extend(moved.values())
        outcomes = {}
        for running in done:
            job_id, attempt = str(running.row["job_id"]), running.ctx.attempt
            row = moved.get(job_id)
            if row is None:
                outcomes[job_id] = self._fenced(job_id, attempt)
                continue
            with job_context_of(row):
                log.info("job %s attempt %d completed in %.3fs", job_id, attempt,
                         running.elapsed)
            outcomes[job_id] = Outcome(job_id, "completed", row["status"])
        return outcomes

    def _fail(self, failed: list[_Running], rows: list[dict[str, Any]]) -> dict[str, Outcome]:
        """Record failed attempts (one transaction for all): RETRYING or DEAD_LETTER each;
        then dead letters go to the DLQ topic and zero-backoff retries to the queue."""
        plans = []
        for running in failed:
            error = running.error
            assert error is not None
            plans.append(Failure(
                str(running.row["job_id"]), running.ctx.attempt, describe(error),
                policy_for(self.settings, running.jt), isinstance(error, PermanentError),
                error.delay if isinstance(error, RetryableError) else None))

        def write(conn: Connection) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
            return record_failures(conn, plans)

        recorded = self._record(lambda: self.writer.call(write))
        outcomes = {}
        dead_letters, requeue = [], []
        for plan, (row, dead_letter) in zip(plans, recorded, strict=True):
            job_id, attempt, message = plan.job_id, plan.attempt, plan.message
            if row is None:
                outcomes[job_id] = self._fenced(job_id, attempt)
                continue
            rows.append(row)
            with job_context_of(row):
                log.warning("job %s attempt %d failed: %s -> %s", job_id, attempt, message,
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

    def _fenced(self, job_id: str, attempt: int) -> Outcome:
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


def _not_waiting(job_id: str, current: dict[str, Any] | None) -> Outcome | PoisonMessage:
    """The answer to a delivery of a job that is not waiting to run (or does not exist)."""
    if current is None:
        return PoisonMessage(f"no job {job_id} in PostgreSQL")
    log.info("job %s is %s; delivery ignored", job_id, current["status"])
    return Outcome(job_id, "ignored", current["status"], "job is not waiting to run")


@contextlib.contextmanager
def job_context_of(row: dict[str, Any]) -> Iterator[None]:
    """Log lines within name the job and attempt of `row`."""
    token = job_context.set({"job_id": str(row["job_id"]), "attempt": row["attempts"],
                             "job_type": row["job_type"]})
    try:
        yield
    finally:
        job_context.reset(token)


@dataclass
class _Running:
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
