"""Running job messages: claim them, run their handlers under their time limits, and
hand the outcomes to `common.outcomes`.

The parts: `Processor` (here) claims deliveries and runs handlers; `common.leases.Leases`
keeps the running attempts' leases and passes cancel requests on; `common.outcomes`
records how each attempt ended; `common.retry` is the one retry policy of them all.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import logging
import time
from typing import Any

from pydantic import ValidationError

from common import jobs, metrics
from common.cache import StatusCache
from common.db import Database, GroupCommitter
from common.dependencies import follow_up, parent_results
from common.errors import HandlerTimeout, PermanentError, RetryableError, ServiceUnavailable
from common.handlers import JobContext, get_job_type, parse_or_permanent
from common.leases import Leases
from common.logs import job_context
from common.models import JobMessage
from common.outcomes import Attempt, Outcome, OutcomeRecorder, pick
from common.queue import Publisher
from common.settings import Settings

log = logging.getLogger(__name__)


class PoisonMessage(ValueError):
    """A record no attempt can ever process (not JSON, no job id, unknown job)."""


def parse_message(data: Any) -> JobMessage:
    """The job message in a CloudEvent's data, or PoisonMessage saying what is wrong."""
    if isinstance(data, bytes | str):
        raise PoisonMessage("event data is not a JSON object")
    try:
        return JobMessage.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) or "data" for e in exc.errors())
        raise PoisonMessage(f"event data is not a job message (bad or missing: {fields})") from exc


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
        self._background = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cache-claims")
        # What follows a job's end (its dependents, its callback) on threads of its own: a
        # slow broker while releasing dependents never holds up the claims' cache writes.
        self._follow = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="follow-up")
        # Deliveries of types with a concurrency limit, within a batch (see handle_batch).
        self._solo = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="limited")
        # Claims commit without waiting for the WAL flush: if PostgreSQL itself crashes
        # within a fraction of a second, the attempt is forgotten and the job runs again
        # (it was never reported done). The outcome's durable commit flushes the claim too.
        self.claims = GroupCommitter(db, durable=False)
        self.leases = Leases(settings, db, on_progress=lambda row: self._cache([row]))
        self.outcomes = OutcomeRecorder(settings, db, publisher, jobs.PublishMarks(db))

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
                                    time.monotonic() + self.settings.claim_cache_delay_seconds)
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
        self._cache(self.leases.still_running(rows))

    def _cache(self, rows: list[dict[str, Any]]) -> None:
        jobs.cache_rows(self.db, self.cache, rows)

    def _start(self, row: dict[str, Any]) -> Attempt:
        """Start the handler of a claimed job in the handler pool, under its time limit."""
        job_id, attempt = str(row["job_id"]), row["attempts"]
        jt = get_job_type(row["job_type"])  # the job's own type, whatever the message said
        ctx = JobContext(
            job_id=row["job_id"], job_type=row["job_type"], attempt=attempt,
            retries=row["retries"], artifact_dir=self.settings.artifact_store,
            progress_sink=lambda fraction, text: self.leases.progress(job_id, attempt, fraction,
                                                                      text),
        )
        if row["depends_on"]:
            try:
                ctx.parent_results = parent_results(self.db, row["depends_on"])
            except ServiceUnavailable as exc:
                running = Attempt(row, jt, ctx, time.monotonic(), time.monotonic(), 0.0)
                running.error = RetryableError(f"could not read the parents' results: {exc}")
                return running
        self.leases.track(job_id, attempt, ctx)
        timeout = pick(jt.timeout_seconds if jt else None, self.settings.handler_timeout_seconds)
        running = Attempt(row, jt, ctx, time.monotonic(), time.monotonic() + timeout, timeout)
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

    def _finish(self, running: Attempt) -> None:
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
        self.leases.release(running.job_id, running.ctx.attempt)

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
            outcomes.update(self.outcomes.complete(done, rows))
        for running in cancelled:
            outcomes[running.job_id] = self.outcomes.cancelled(running, rows)
        if failed:
            outcomes.update(self.outcomes.fail(failed, rows))
        self._cache(rows)
        followed = [row for row in rows if row["has_dependents"] or row["callback_url"]]
        if followed:  # dependents and callbacks of jobs that ended; the sweeper's otherwise
            self._follow.submit(follow_up, self.db, self.cache, self.publisher,
                                self.settings, followed)
        for running in started:
            job_type = running.row["job_type"]
            outcome = outcomes[running.job_id]
            metrics.ATTEMPT_SECONDS.labels(job_type, outcome.outcome).observe(running.elapsed)
            counter = {"completed": metrics.COMPLETED, "dead_lettered": metrics.DEAD_LETTERED,
                       "cancelled": metrics.CANCELLED}.get(outcome.outcome)
            if counter is not None:
                counter.labels(job_type).inc()
            if running.error is not None and outcome.outcome in ("retrying", "dead_lettered"):
                metrics.FAILED.labels(job_type).inc()
        return [outcomes[str(r["job_id"])] for r in claimed]


def _not_waiting(job_id: str, current: dict[str, Any] | None) -> Outcome | PoisonMessage:
    """The answer to a delivery of a job that is not waiting to run (or does not exist)."""
    if current is None:
        return PoisonMessage(f"no job {job_id} in PostgreSQL")
    log.info("job %s is %s; delivery ignored", job_id, current["status"])
    return Outcome(job_id, "ignored", current["status"], "job is not waiting to run")


