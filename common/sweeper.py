"""Recovery from PostgreSQL, the source of truth: lost messages, dead workers, due retries.

Run periodically (the `sweeper` function); several sweepers may run at once, since
every batch is taken with FOR UPDATE SKIP LOCKED and every time is the database's.
"""

from __future__ import annotations

import logging
from typing import Any

from common import callbacks, dependencies, jobs, metrics, schedules
from common.artifacts import delete_artifacts
from common.cache import StatusCache
from common.db import Database, is_transient, rows_as_dicts
from common.errors import ServiceUnavailable
from common.handlers import get_job_type
from common.lifecycle import transition
from common.models import JobStatus
from common.outcomes import policy_for, publish_dead_letters, record_failure
from common.queue import Publisher, job_event, job_topic
from common.settings import Settings

log = logging.getLogger(__name__)

# Jobs whose message should be on the queue but may not be: never published (submit died
# between commit and publish, or the broker was down), due retries, and jobs published so
# long ago that the message was probably lost (the local broker forgets on restart).
_DUE = """
SELECT job_id, job_type, status, retries, attempts FROM jobs
WHERE (
    status = 'QUEUED'
    AND (next_attempt_at IS NULL OR next_attempt_at <= now())
    AND ((published_at IS NULL AND (next_attempt_at IS NOT NULL  -- a delayed job, now due
                                    OR updated_at < now() - make_interval(secs => :grace)))
         OR published_at < now() - make_interval(secs => :stale))
) OR (
    status = 'RETRYING' AND next_attempt_at <= now()
    -- a retry that waited out its backoff is ours to publish; one without backoff was
    -- handed to the queue by `process` itself (its mark may lag), so give it the grace
    AND ((published_at IS NULL AND (next_attempt_at > updated_at
                                    OR updated_at < now() - make_interval(secs => :grace)))
         OR published_at < now() - make_interval(secs => :stale))
)
-- Longest due first, whatever made it due: a delayed job or a retry is never starved by
-- a backlog of never-published ones (NULLS FIRST would put a thousand of them ahead).
ORDER BY COALESCE(next_attempt_at, created_at), created_at
LIMIT :limit
FOR UPDATE SKIP LOCKED
"""

_EXPIRED = """
SELECT job_id, job_type, attempts, cancel_requested_at IS NOT NULL AS cancel FROM jobs
WHERE status = 'IN_PROGRESS' AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT :limit
FOR UPDATE SKIP LOCKED
"""


_EXPIRED_FINAL = """
DELETE FROM jobs WHERE job_id IN (
    SELECT job_id FROM jobs
    WHERE status IN ('COMPLETED', 'CANCELLED', 'DEAD_LETTER')
      -- the shorter period bounds the index range; the CASE then picks per status
      AND updated_at < now() - make_interval(secs => CAST(:shorter AS float8))
      AND updated_at < now() - make_interval(secs => CASE WHEN status = 'DEAD_LETTER'
                          THEN CAST(:dead AS float8) ELSE CAST(:finished AS float8) END)
      -- a parent stays while a child waits for its other parents: the child reads its
      -- result (ctx.parent_results) when it runs
      AND NOT (has_dependents AND EXISTS (
          SELECT 1 FROM job_dependencies d JOIN jobs c ON c.job_id = d.child_id
          WHERE d.parent_id = jobs.job_id AND c.status = 'WAITING'))
    ORDER BY updated_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED)
RETURNING job_id::text
"""


def forget_old_jobs(db: Database, cache: StatusCache, settings: Settings,
                    limit: int = 1000) -> int:
    """Retention: delete final jobs past their time (with their attempts, cache entries and
    artifacts) and old dead-letter records, one bounded batch per call: short
    transactions, no long locks. Returns how many jobs were deleted."""
    day = 86400.0
    finished = settings.retain_finished_days * day or float("inf")
    dead = settings.retain_dead_days * day or float("inf")
    if finished == dead == float("inf"):
        return 0
    # make_interval takes no infinity: a century stands for "forever".
    finished, dead = (min(x, 36525 * day) for x in (finished, dead))
    with db.transaction() as conn:
        ids = [row[0] for row in conn.run(_EXPIRED_FINAL, finished=finished, dead=dead,
                                          shorter=min(finished, dead), limit=limit)]
        if ids:
            conn.run("DELETE FROM cache_repairs WHERE job_id = ANY(CAST(:ids AS uuid[]))",
                     ids=ids)
        conn.run("DELETE FROM dead_letters WHERE dead_letter_id IN (SELECT dead_letter_id"
                 " FROM dead_letters WHERE dead_lettered_at < now() - make_interval(secs =>"
                 " CAST(:dead AS float8)) ORDER BY dead_lettered_at LIMIT :limit"
                 " FOR UPDATE SKIP LOCKED)",
                 dead=dead, limit=limit)
    if ids:
        cache.forget(ids)  # a failure here leaves entries that expire with their TTL
        try:
            delete_artifacts(settings.artifact_store, ids)
        except Exception as exc:  # e.g. object storage refusing: the rows are gone anyway
            log.error("deleted %d job(s) past their retention but not all their artifacts"
                      " (%s); these stay in %s: %s", len(ids), exc, settings.artifact_store,
                      ", ".join(ids[:20]))
        log.info("deleted %d job(s) past their retention", len(ids))
    return len(ids)


def fold_counts(db: Database) -> int:
    """Add the ledger of count changes (written by triggers on jobs) into job_counts."""
    rows = db.run("WITH folded AS (DELETE FROM job_count_changes RETURNING job_type, status,"
                  " delta) INSERT INTO job_counts (job_type, status, n) SELECT job_type,"
                  " status, sum(delta) FROM folded GROUP BY 1, 2 ORDER BY 1, 2"
                  " ON CONFLICT (job_type, status) DO UPDATE SET n = job_counts.n + EXCLUDED.n"
                  " RETURNING 1")
    return len(rows)


def reclaim_expired(db: Database, cache: StatusCache, publisher: Publisher,
                    settings: Settings, limit: int = 500) -> int:
    """Fail the attempts of workers whose lease ran out; the attempt counts. One whose job
    was asked to stop ends CANCELLED, as it would have had its worker lived."""
    rows, letters = [], []
    with db.transaction() as conn:
        for row in rows_as_dicts(conn, conn.run(_EXPIRED, limit=limit)):
            job_id = str(row["job_id"])
            if row["cancel"]:
                message = "cancelled (its worker stopped answering before it stopped)"
                new = transition(conn, job_id, JobStatus.CANCELLED,
                                 sources=[JobStatus.IN_PROGRESS], attempt=row["attempts"],
                                 values={"lease_expires_at": None, "error_message": message})
                if new is not None:
                    jobs.finish_attempt(conn, job_id, row["attempts"], "CANCELLED", message)
                    metrics.CANCELLED.labels(row["job_type"]).inc()
                    rows.append(new)
                continue
            policy = policy_for(settings, get_job_type(row["job_type"]))
            new, letter = record_failure(
                conn, job_id, row["attempts"], "lease expired: the worker stopped answering",
                policy, delay_floor=0.0)
            if new is not None:
                rows.append(new)
            if letter is not None:
                letters.append(letter)
    jobs.cache_rows(db, cache, rows)
    if letters:
        publish_dead_letters(publisher, settings, letters)
    if rows:
        log.warning("reclaimed %d job(s) from expired leases", len(rows))
    return len(rows)


def publish_due(db: Database, publisher: Publisher, settings: Settings,
                limit: int = 1000) -> int:
    """(Re)publish jobs that should be on the queue; a duplicate is harmless."""
    grace = settings.publish_timeout_seconds + 2
    with db.transaction() as conn:
        rows: list[dict[str, Any]] = rows_as_dicts(conn, conn.run(
            _DUE, grace=grace, stale=settings.requeue_after_seconds, limit=limit))
        if not rows:
            return 0
        events = [
            job_event(job_topic(settings, row["job_type"]), row["job_id"], row["job_type"],
                      ce_id=f"{row['job_id']}:{row['status'].lower()}-{row['attempts']}",
                      source="/jobs/sweeper")
            for row in rows
        ]
        publisher.publish(events)
        conn.run("UPDATE jobs SET published_at = now() WHERE job_id = ANY(CAST(:ids AS uuid[]))",
                 ids=[str(r["job_id"]) for r in rows])
    log.info("published %d due job(s)", len(rows))
    return len(rows)


def sweep(db: Database, cache: StatusCache, publisher: Publisher,
          settings: Settings) -> dict[str, int]:
    """One pass: reclaim dead workers' jobs, publish everything that is due, and the rest of
    the upkeep; then fire due schedules."""
    counts: dict[str, int] = {}
    failure: ServiceUnavailable | None = None
    steps = {
        "reclaimed": lambda: reclaim_expired(db, cache, publisher, settings),
        "published": lambda: publish_due(db, publisher, settings),
        "settled": lambda: dependencies.settle(db, cache, publisher, settings),
        "cache_repaired": lambda: jobs.repair_cache(db, cache),
        "deleted": lambda: forget_old_jobs(db, cache, settings),
        "counts_folded": lambda: fold_counts(db),
        # after the recovery of jobs above: a schedule's trouble never holds that up
        "scheduled": lambda: len(schedules.fire_due(db, publisher, settings)),
        # last: a slow receiver holds up nothing else (a few sends, each time-limited)
        "callbacks_tried": lambda: callbacks.deliver_due(db, settings),
    }
    for name, step in steps.items():
        # Each step on its own: a broker outage must not stop the cache repair, and so on.
        try:
            counts[name] = step()
        except ServiceUnavailable as exc:
            log.warning("sweep step %s failed: %s", name, exc)
            failure = failure or exc
        except Exception as exc:
            if not is_transient(exc):  # a bug: let it show
                raise
            log.warning("sweep step %s failed, tried again next sweep: %s", name, exc)
    if failure is not None:
        raise failure
    return counts
