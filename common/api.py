"""The public HTTP API's operations, independent of how requests arrive."""

from __future__ import annotations

import collections
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common import callbacks, clients, deadletters, dependencies, jobs, metrics
from common.auth import Principal
from common.cache import is_final
from common.db import Connection
from common.errors import ApiError, ServiceUnavailable
from common.handlers import get_job_type, validate_payload
from common.lifecycle import transition
from common.models import (
    AttemptPage,
    CallbackPage,
    DeadLetterPage,
    JobDocument,
    JobPage,
    JobStatus,
    JobSubmission,
    Stats,
)
from common.queue import job_event, job_topic

log = logging.getLogger(__name__)

MAX_BATCH = 1000
IDEMPOTENCY_KEY_MAX = 200


class BatchSubmission(BaseModel):
    """Body of `POST /jobs/batch`: several jobs in one request and one transaction."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobSubmission] = Field(min_length=1, max_length=MAX_BATCH)


def parse_job_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError as exc:
        raise ApiError(400, "Bad job id", f"{raw!r} is not a UUID") from exc


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key.strip() or len(key) > IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise ApiError(400, "Bad Idempotency-Key",
                       f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} printable characters")
    return key


def submit(submissions: list[JobSubmission], idempotency_key: str | None = None, *,
           batch: bool = False, principal: Principal | None = None
           ) -> tuple[list[JobDocument], bool]:
    """Persist jobs as QUEUED, enqueue them, cache their status.

    A batch under an idempotency key is one request: each item's key lives in the
    batch's own namespace, and its fingerprint covers the whole batch, so the same key
    with any other batch is a 409.

    Returns the documents and whether every new job's message was confirmed by
    the broker. When the broker is unreachable the jobs are still accepted: they
    are durable in PostgreSQL and the sweeper publishes them once it is back.
    """
    clients.handlers()
    settings = clients.settings()
    payloads = _validated_payloads(submissions) if batch else \
        [validate_payload(sub.job_type, sub.payload) for sub in submissions]
    dependencies.check_references(submissions, batch)
    for sub in submissions:
        if sub.callback_url is not None:
            callbacks.check_url(sub.callback_url, settings)
    if principal is not None:
        for sub, payload in zip(submissions, payloads, strict=True):
            check_type_scope(principal, sub.job_type, payload)
    # The fingerprint tells a retried request from another one under the same key; without
    # a key there is nothing to compare it with.
    prints: list[str | None]
    if batch:
        keys = [jobs.batch_item_key(idempotency_key, i) if idempotency_key else None
                for i in range(len(submissions))]
        whole = jobs.request_fingerprint(*submissions) if idempotency_key else None
        prints = [f"{whole}:{i}" if whole else None for i in range(len(submissions))]
    else:
        keys = [idempotency_key]
        prints = [jobs.request_fingerprint(submissions[0]) if idempotency_key else None]
    items = [(sub, payload, key, max_retries_for(sub, settings.max_retries), fingerprint)
             for sub, payload, key, fingerprint
             in zip(submissions, payloads, keys, prints, strict=True)]
    db = clients.database()
    submitted_by = principal.name if principal else None
    if any(sub.depends_on for sub in submissions):
        created = dependencies.create_with_parents(db, items, submitted_by)
    else:
        created = jobs.create_jobs(db, items, clients.writer(), submitted_by=submitted_by)
    # A delayed job (run_at in the future) is published by the sweeper once it is due.
    submitted = collections.Counter(row["job_type"] for row, is_new in created if is_new)
    for job_type, count in submitted.items():
        metrics.SUBMITTED.labels(job_type).inc(count)
    new_rows = [row for row, is_new in created if is_new and row["next_attempt_at"] is None
                and row["status"] == JobStatus.QUEUED.value]
    events = [job_event(job_topic(settings, row["job_type"]), row["job_id"], row["job_type"])
              for row in new_rows]
    refusal: ServiceUnavailable | None = None
    acknowledged = None
    try:
        acknowledged = clients.publisher().send(events)
    except ServiceUnavailable as exc:
        refusal = exc
    # The cache write overlaps the broker's acknowledgement.
    docs = jobs.cache_rows(db, clients.cache(), [row for row, _ in created], announce=False)
    if acknowledged is not None:
        try:
            acknowledged()
        except ServiceUnavailable as exc:
            refusal = exc
    if refusal is not None:
        log.warning("accepted %d job(s) but could not enqueue them now (%s);"
                    " the sweeper will publish them", len(new_rows), refusal.detail)
    elif new_rows:
        clients.publish_marks().add([(str(row["job_id"]), row["attempts"])
                                     for row in new_rows])
    return [JobDocument.model_validate(doc) for doc in docs], refusal is None


def _validated_payloads(submissions: list[JobSubmission]) -> list[dict[str, Any]]:
    """Each batch item's payload checked against its type; one 422 naming every bad item
    (`errors[].loc` starts with `jobs`, the item's index, then `job_type` or `payload`)."""
    payloads: list[dict[str, Any]] = []
    bad: list[tuple[int, ApiError]] = []
    for i, sub in enumerate(submissions):
        try:
            payloads.append(validate_payload(sub.job_type, sub.payload))
        except ApiError as refusal:
            bad.append((i, refusal))
    if not bad:
        return payloads
    errors: list[dict[str, Any]] = []
    for i, item in bad:
        if item.errors:
            errors += [{**e, "loc": ["jobs", i, "payload", *e["loc"]]} for e in item.errors]
        else:
            errors.append({"loc": ["jobs", i, "job_type"], "msg": item.detail,
                           "type": "unknown_job_type"})
    if len(bad) == 1:
        i, item = bad[0]
        raise ApiError(422, item.title, f"item {i}: {item.detail}", errors=errors)
    raise ApiError(422, "Invalid batch", f"{len(bad)} of {len(submissions)} items are invalid: "
                   + "; ".join(f"item {i}: {item.detail}" for i, item in bad), errors=errors)


def check_type_scope(principal: Principal, job_type: str, payload: dict[str, Any],
                     doing: str = "submitting") -> None:
    """Some job types need more than `jobs:submit` or `jobs:read` (DATA_EXPORT reads every
    job: admin), to submit them and to download what they made."""
    jt = get_job_type(job_type)
    scope = None if jt is None else jt.scope(payload) if callable(jt.scope) else jt.scope
    if scope and not principal.allows(scope):
        raise ApiError(403, "Forbidden", f"{doing} a {job_type} job needs the {scope!r}"
                                         " scope, which this token lacks")


def max_retries_for(submission: JobSubmission, default: int) -> int:
    """The job's own budget, else its type's, else the global default."""
    if submission.max_retries is not None:
        return submission.max_retries
    jt = get_job_type(submission.job_type)
    return jt.max_retries if jt is not None and jt.max_retries is not None else default


def get_job(job_id: str) -> JobDocument:
    """Cache first, PostgreSQL on a miss (then fill the cache)."""
    return JobDocument.model_validate(job_document(job_id))


def job_document(job_id: str) -> dict[str, Any]:
    """The job's document (JSON-ready): from the cache if it is final, else PostgreSQL.

    Reads never go backwards: a cache write can fail (Redis stopped, paused, slow) and
    leave an older document behind while PostgreSQL, which other readers may already
    have been answered from, holds a newer one. A final document (COMPLETED, CANCELLED)
    is the last version there will ever be, so only those are served from the cache; any
    other state is read from PostgreSQL, which is never behind.
    """
    job_id = parse_job_id(job_id)
    cache = clients.cache()
    doc = cache.get(job_id)
    if doc is not None and is_final(doc):
        metrics.STATUS_LOOKUPS.labels("cache").inc()
        return doc
    metrics.STATUS_LOOKUPS.labels("database").inc()
    with clients.database().connection() as conn:
        row = jobs.get_job(conn, job_id)
    if row is None:
        raise ApiError(404, "Job not found", f"no job {job_id}")
    doc = jobs.document(row)
    if is_final(doc):
        cache.put([doc])  # a fill: nothing is lost if it fails
    return doc


def list_jobs(status: list[str] | None, job_type: list[str] | None, cursor: str | None,
              limit: int, id_prefix: str | None = None) -> JobPage:
    valid = {s.value for s in JobStatus}
    bad = [s for s in status or [] if s not in valid]
    if bad:
        raise ApiError(400, "Bad status filter",
                       f"unknown status {bad[0]!r}; one of {', '.join(sorted(valid))}")
    with clients.database().transaction() as conn:
        if status:  # the pairs list_jobs reads and the rows: one snapshot
            conn.run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        rows, next_cursor = jobs.list_jobs(conn, status=status, job_type=job_type,
                                           cursor=cursor, limit=limit,
                                           ids=jobs.id_range(id_prefix) if id_prefix else None)
    return JobPage.model_validate({"items": [jobs.document(r) for r in rows],
                                   "next_cursor": next_cursor})


def cancel(job_id: str) -> JobDocument:
    """Cancel a job: a waiting one never runs; a running one is asked to stop."""
    job_id = parse_job_id(job_id)
    db = clients.database()
    with db.transaction() as conn:
        row = transition(conn, job_id, JobStatus.CANCELLED,
                         sources=[JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RETRYING],
                         values={"next_attempt_at": None})
        if row is None:
            row = jobs.request_cancel(conn, job_id)
        if row is None:
            raise jobs.refuse_move(conn, job_id, "Job already ended",
                                   "only waiting or running jobs can be cancelled")
    if row["status"] == JobStatus.CANCELLED.value:  # a waiting job, cancelled here
        metrics.CANCELLED.labels(row["job_type"]).inc()
        if row["has_dependents"] or row["callback_url"]:
            dependencies.follow_up(db, clients.cache(), clients.publisher(),
                                   clients.settings(), [row])
    jobs.cache_rows(db, clients.cache(), [row])
    return JobDocument.model_validate(jobs.document(row))


def attempts(job_id: str) -> AttemptPage:
    """A job's attempt history, oldest first."""
    with _existing_job(job_id) as (conn, job_id):
        return AttemptPage.model_validate({"items": jobs.attempt_history(conn, job_id)})


@contextlib.contextmanager
def _existing_job(raw_id: str) -> Iterator[tuple[Connection, str]]:
    """A connection and the parsed id of a job that exists; 400 or 404 otherwise."""
    job_id = parse_job_id(raw_id)
    with clients.database().connection() as conn:
        if jobs.get_job(conn, job_id) is None:
            raise ApiError(404, "Job not found", f"no job {job_id}")
        yield conn, job_id


def stats() -> Stats:
    """Counts by status and type, completions per minute, recent and running jobs."""
    with clients.database().connection() as conn:
        counts = {s.value: 0 for s in JobStatus}
        by_type: dict[str, dict[str, int]] = {}
        for job_type, status, n in jobs.counts(conn):
            counts[status] += n
            by_type.setdefault(job_type, {})[status] = n
        minutes: dict[str, dict[str, Any]] = {}
        for minute, outcome, n in conn.run(
                "SELECT date_trunc('minute', finished_at), outcome, count(*) FROM job_attempts"
                " WHERE finished_at > now() - interval '15 minutes'"
                " AND finished_at IS NOT NULL GROUP BY 1, 2 ORDER BY 1"):
            entry = minutes.setdefault(minute.isoformat(), {
                "minute": minute.isoformat(), "completed": 0, "failed": 0, "cancelled": 0})
            key = {"COMPLETED": "completed", "CANCELLED": "cancelled"}.get(outcome, "failed")
            entry[key] += n
        recent = jobs.recent(conn, limit=20)
        running = jobs.recent(conn, limit=50, status="IN_PROGRESS")
    return Stats.model_validate({
        "counts": counts, "by_type": by_type, "throughput": list(minutes.values()),
        "recent": [jobs.document(r) for r in recent],
        "running": [jobs.document(r) for r in running]})


def list_dead_letters(cursor: str | None, limit: int) -> DeadLetterPage:
    with clients.database().connection() as conn:
        rows, next_cursor = deadletters.list_dead_letters(conn, cursor, limit)
    return DeadLetterPage.model_validate({
        "items": [deadletters.dead_letter_document(r) for r in rows],
        "next_cursor": next_cursor})


def replay(job_id: str, with_dependents: bool = False) -> JobDocument:
    """Send a dead-lettered job back to QUEUED with a fresh retry budget, and enqueue it;
    `with_dependents`: the jobs its failure cancelled wait for it again."""
    job_id = parse_job_id(job_id)
    clients.handlers()  # the type's topic
    settings = clients.settings()
    db = clients.database()
    with db.transaction() as conn:
        row = deadletters.replay(conn, job_id)
        revived = dependencies.revive(conn, job_id) if with_dependents else []
    if revived:
        log.info("replayed job %s with %d dependent(s) waiting again", job_id, len(revived))
    event = job_event(job_topic(settings, row["job_type"]), job_id, row["job_type"],
                      ce_id=f"{job_id}:replay-{row['attempts']}", source="/jobs/retry")
    try:
        clients.publisher().publish([event])
        jobs.mark_published(db, [(job_id, row["attempts"])])
    except ServiceUnavailable as exc:
        log.warning("replayed job %s not enqueued now (%s); the sweeper will", job_id, exc)
    jobs.cache_rows(db, clients.cache(), [row])
    return JobDocument.model_validate(jobs.document(row))


def dependents(job_id: str) -> JobPage:
    """The jobs that depend on `job_id` (up to 1,000), oldest first."""
    with _existing_job(job_id) as (conn, job_id):
        rows = dependencies.dependents(conn, job_id)
    return JobPage.model_validate({"items": [jobs.document(r) for r in rows]})


def callback_deliveries(job_id: str) -> CallbackPage:
    """A job's completion callbacks and every try at delivering them."""
    with _existing_job(job_id) as (conn, job_id):
        return CallbackPage.model_validate({"items": callbacks.deliveries(conn, job_id)})
