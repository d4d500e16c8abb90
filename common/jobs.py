"""Jobs in PostgreSQL: create, read, list, claim, and record outcomes."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common import ratelimits
from common.cache import StatusCache, is_final
from common.db import Connection, Database, GroupCommitter, rows_as_dicts
from common.errors import ApiError
from common.lifecycle import transition_many_sql, transition_sql
from common.models import JobDocument, JobStatus, JobSubmission, shown_url
from common.ratelimits import RateLimit

S = JobStatus
log = logging.getLogger(__name__)
PAGE_MAX = 200


def request_fingerprint(*submissions: JobSubmission) -> str:
    """A stable hash of what was asked, to tell a retried request from a different one."""
    canonical = json.dumps([s.model_dump(mode="json") for s in submissions], sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def document(row: dict[str, Any]) -> dict[str, Any]:
    """The API's job document (JSON-ready, through the `JobDocument` model) from a row."""
    return JobDocument.model_validate({
        "job_id": str(row["job_id"]),
        "job_type": row["job_type"],
        "status": row["status"],
        "retries": row["retries"],
        "max_retries": row["max_retries"],
        "attempts": row["attempts"],
        "payload": row["payload_json"],
        "result": row["result_json"],
        "error_message": row["error_message"],
        "next_attempt_at": _iso(row["next_attempt_at"]),
        "run_at": _iso(row.get("run_at")),
        "progress": row.get("progress"),
        "progress_message": row.get("progress_message"),
        "cancel_requested": row.get("cancel_requested_at") is not None,
        "submitted_by": row.get("submitted_by"),
        "depends_on": [str(p) for p in row.get("depends_on") or ()],
        "cancelled_by": _str(row.get("cancelled_by")),
        "callback_url": shown_url(row.get("callback_url")),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "version": row["version"],
    }).model_dump(mode="json")


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class Graph:
    """Where new jobs stand among others (see `common.dependencies.create_with_parents`):
    their ids, first states, parents, and whether a later item of theirs waits for them."""

    ids: list[str]
    statuses: list[str]
    parents: list[list[str]]
    has_dependents: list[bool]


def batch_item_key(key: str, index: int) -> str:
    """The key a batch's item is stored under: a tab cannot be in a client's key
    (api.check_idempotency_key), so no single submit's key can ever name a batch's item."""
    return f"batch\t{key}\t{index}"


def batch_client_key(stored: str | None) -> str | None:
    """The client's key of a batch item's stored key; None for any other key."""
    if stored is None or not stored.startswith("batch\t"):
        return None
    return stored.split("\t")[1]


def rehearse_submit(db: Database) -> str:
    """Insert one job and roll it back, so that a new process's first submit does not pay
    for its server session's first insert (reading the table's catalog entries, compiling
    its triggers): about 10 ms, measured in-process. Nothing is left behind; returns the
    id the job had."""
    with db.connection(begin=True) as conn:
        try:
            [(row, _)] = create_jobs(db, [(JobSubmission(job_type="NOOP"), {}, None, 0, None)],
                                     conn=conn)
        finally:
            conn.run("ROLLBACK")
    return str(row["job_id"])


def create_jobs(
    db: Database,
    submissions: list[tuple[JobSubmission, dict[str, Any], str | None, int, str | None]],
    writer: GroupCommitter | None = None,
    submitted_by: str | None = None,
    *,
    conn: Connection | None = None,
    graph: Graph | None = None,
) -> list[tuple[dict[str, Any], bool]]:
    """Insert jobs (QUEUED, or as `graph` says) in one statement; return (row, created) for
    each, in order.

    Each item is (submission, validated payload, idempotency key, max retries,
    request fingerprint). A key seen before with the same request returns the existing
    job (created=False); with another request it is a 409. With a `writer`, the insert
    shares its commit with concurrent submits; with `conn`, it is part of the caller's
    transaction (a schedule's tick, a job with parents).
    """
    ids = graph.ids if graph else [str(uuid.uuid4()) for _ in submissions]
    statement = (
        "INSERT INTO jobs (job_id, job_type, payload_json, max_retries, idempotency_key,"
        " request_hash, run_at, next_attempt_at, submitted_by, callback_url, status,"
        " depends_on, has_dependents)"
        " SELECT id, type, payload, max, key, hash, run_at,"
        " CASE WHEN run_at > now() THEN run_at END, CAST(:submitted_by AS text), callback,"
        " COALESCE(status, 'QUEUED'), CAST(string_to_array(parents, ',') AS uuid[]),"
        " COALESCE(dependents, false)"
        " FROM unnest(CAST(:ids AS uuid[]), CAST(:job_types AS text[]),"
        " CAST(:payloads AS jsonb[]), CAST(:maxes AS int[]), CAST(:keys AS text[]),"
        " CAST(:hashes AS text[]), CAST(:run_ats AS timestamptz[]), CAST(:callbacks AS text[]),"
        " CAST(:statuses AS job_status[]), CAST(:parents AS text[]),"
        " CAST(:dependents AS boolean[]))"
        " AS s(id, type, payload, max, key, hash, run_at, callback, status, parents, dependents)"
        " ON CONFLICT (idempotency_key) DO NOTHING RETURNING *")
    none = [None] * len(submissions)
    params = dict(
        ids=ids, job_types=[s.job_type for s, *_ in submissions],
        payloads=[json.dumps(p) for _, p, *_ in submissions],
        maxes=[m for *_, m, _ in submissions], keys=[k for _, _, k, _, _ in submissions],
        hashes=[h for *_, h in submissions], submitted_by=submitted_by,
        run_ats=[s.run_at.isoformat() if s.run_at else None for s, *_ in submissions],
        callbacks=[s.callback_url for s, *_ in submissions],
        statuses=graph.statuses if graph else none,
        parents=[",".join(p) or None for p in graph.parents] if graph else none,
        dependents=graph.has_dependents if graph else none)
    def write(c: Connection) -> list[tuple[dict[str, Any], bool]]:
        return _with_existing(c, submissions, ids, rows_as_dicts(c, c.run(statement, **params)))

    keyed_batch = len(submissions) > 1 and any(k for _, _, k, _, _ in submissions)
    if conn is not None:  # the caller's transaction: a 409 rolls all of it back
        return write(conn)
    if keyed_batch:
        # A batch under an idempotency key is one transaction with its 409: items whose
        # keys are new must not stay behind when another item's key says "reused".
        if writer is not None:
            return writer.call(write)
        with db.transaction() as c:
            return write(c)
    # One statement: atomic on its own, whether in autocommit or in a group commit.
    if writer is not None:
        inserted = writer.run(statement, **params)
    else:
        with db.connection() as c:
            inserted = rows_as_dicts(c, c.run(statement, **params))
    if len(inserted) == len(ids):  # every one new: nothing to look up
        by_id = {str(row["job_id"]): row for row in inserted}
        return [(by_id[i], True) for i in ids]
    with db.connection() as c:
        return _with_existing(c, submissions, ids, inserted)


def _with_existing(c: Connection, submissions: list[tuple[JobSubmission, dict[str, Any],
                                                          str | None, int, str | None]],
                   ids: list[str], inserted: list[dict[str, Any]]
                   ) -> list[tuple[dict[str, Any], bool]]:
    """(row, created) per item: the inserted row, else the job its key named before (the
    same request: created=False; another one: ApiError 409)."""
    by_id = {str(row["job_id"]): row for row in inserted}
    missing = [k for (_, _, k, _, _), i in zip(submissions, ids, strict=True) if i not in by_id]
    existing = {}
    if missing:
        existing = {row["idempotency_key"]: row for row in rows_as_dicts(c, c.run(
            "SELECT * FROM jobs WHERE idempotency_key = ANY(CAST(:keys AS text[]))",
            keys=missing))}
    out: list[tuple[dict[str, Any], bool]] = []
    for (_, _, key, _, fingerprint), job_id in zip(submissions, ids, strict=True):
        if job_id in by_id:
            out.append((by_id[job_id], True))
            continue
        old = existing[key]
        if old["request_hash"] != fingerprint:
            client_key = batch_client_key(key)
            shown = f"{client_key!r} (a batch's key)" if client_key is not None else repr(key)
            raise ApiError(409, "Idempotency key reused",
                           f"Idempotency-Key {shown} was already used for a different request"
                           f" (job {old['job_id']})")
        out.append((old, False))
    return out


class PublishMarks:
    """Records `published_at` in the background, many jobs per statement.

    Not in the request path: a mark lost in a crash only means the sweeper publishes
    that job once more, and `process` ignores the duplicate.
    """

    def __init__(self, db: Database, interval: float = 0.02) -> None:
        self.db = db
        self.interval = interval
        self._pending: list[tuple[str, int]] = []
        self._arrived = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, published: list[tuple[str, int]]) -> None:
        """Queue (job id, attempts when published) marks."""
        with self._arrived:
            self._pending.extend(published)
            self._arrived.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="publish-marks",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._arrived:  # asleep while there is nothing to mark
                self._arrived.wait_for(lambda: self._pending)
            time.sleep(self.interval)  # let the marks of concurrent submits join this batch
            with self._arrived:
                batch, self._pending = self._pending, []
            try:
                mark_published(self.db, batch)
            except Exception as exc:
                log.warning("could not mark %d job(s) published: %s", len(batch), exc)


def mark_published(db: Database, published: list[tuple[str, int]]) -> None:
    """Record that a job's message reached the broker (the sweeper re-sends unmarked ones).

    Each item is (job id, attempts when published): a mark that arrives after the job
    moved on (claimed, failed, waiting for a retry of its own) must not hide that retry.
    """
    if published:
        # SKIP LOCKED: a locked job is being claimed (a mark would not apply anyway), and
        # waiting for it could deadlock with a multi-row claim. A job deferred since its
        # publish (a concurrency or rate limit put it back to wait) is the sweeper's to
        # publish again when due: a late mark must not hide it for requeue_after.
        published = sorted(published)
        with db.transaction(durable=False) as conn:  # a lost mark costs one duplicate
            conn.run("UPDATE jobs SET published_at = now() WHERE job_id IN (SELECT job_id"
                     " FROM jobs JOIN unnest(CAST(:ids AS uuid[]), CAST(:ns AS int[]))"
                     " AS p(id, n) ON jobs.job_id = p.id AND jobs.attempts = p.n"
                     " WHERE jobs.status IN ('QUEUED', 'RETRYING') AND jobs.rate_slot_at IS NULL"
                     " AND (jobs.next_attempt_at IS NULL OR jobs.next_attempt_at <= now())"
                     " FOR UPDATE OF jobs SKIP LOCKED)",
                     ids=[job_id for job_id, _ in published], ns=[n for _, n in published])


def refuse_move(conn: Connection, job_id: str, title: str, allowed: str) -> ApiError:
    """The error for a move a job cannot make: 404 if it does not exist, else 409."""
    current = get_job(conn, job_id)
    if current is None:
        return ApiError(404, "Job not found", f"no job {job_id}")
    return ApiError(409, title, f"job {job_id} is {current['status']}; {allowed}")


def get_job(conn: Connection, job_id: str) -> dict[str, Any] | None:
    rows = rows_as_dicts(conn, conn.run(
        "SELECT * FROM jobs WHERE job_id = CAST(:id AS uuid)", id=job_id))
    return rows[0] if rows else None


def counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(job type, status, how many) for every pair with jobs: the folded counts plus the
    changes not yet folded (see migration 0005), read in one snapshot; no scan of jobs."""
    return [(t, s, int(n)) for t, s, n in conn.run(
        "SELECT job_type, status::text, sum(n) FROM (SELECT job_type, status, n FROM job_counts"
        " UNION ALL SELECT job_type, status, delta FROM job_count_changes) AS c"
        " GROUP BY 1, 2 HAVING sum(n) <> 0 ORDER BY 1, 2")]


def encode_cursor(*parts: Any) -> str:
    raw = json.dumps([p.isoformat() if isinstance(p, datetime) else str(p) for p in parts])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> list[str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        parts = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(parts, list) or len(parts) != size:
            raise ValueError
        return [str(p) for p in parts]
    except ValueError as exc:
        raise ApiError(400, "Bad cursor", "cursor is not one this API handed out") from exc


def id_range(prefix: str) -> tuple[str, str]:
    """The lowest and highest job id starting with `prefix` (a start of a UUID's text,
    any case); ApiError(400) for anything else."""
    text = prefix.lower()
    digits = text.replace("-", "")
    lowest = str(uuid.UUID(digits.ljust(32, "0"))) if re.fullmatch(r"[0-9a-f]{1,32}", digits) \
        else ""
    if not lowest.startswith(text):
        raise ApiError(400, "Bad id prefix", f"{prefix!r} is not the start of a job id (hex"
                                             " digits, with dashes only where a UUID has them)")
    return lowest, str(uuid.UUID(digits.ljust(32, "f")))


def list_jobs(conn: Connection, *, status: list[str] | None, job_type: list[str] | None,
              cursor: str | None, limit: int, ids: tuple[str, str] | None = None
              ) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paginated on (created_at, job_id).

    Filtered by status, the query is one index range per (status, type) pair that has
    jobs (`counts`, kept by triggers), merged: with a million finished jobs, asking for
    the few that are not finished reads those few, not the million (one range over every
    status would filter them all out one by one).
    """
    params: dict[str, Any] = {"limit": limit + 1}
    after = ""
    if cursor:
        created, job_id = decode_cursor(cursor, 2)
        try:
            uuid.UUID(job_id)
            datetime.fromisoformat(created)
        except ValueError as exc:
            raise ApiError(400, "Bad cursor", "cursor is not one this API handed out") from exc
        after = ("(created_at, job_id) < (CAST(:c_created AS timestamptz),"
                 " CAST(:c_id AS uuid))")
        params.update(c_created=created, c_id=job_id)
    ranges: list[str] = []  # the WHERE of each index range
    if status:
        pairs = [(t, s) for t, s, _ in counts(conn)
                 if s in status and (not job_type or t in job_type)]
        for i, (t, s) in enumerate(pairs):
            ranges.append(f"status = CAST(:s{i} AS job_status) AND job_type = :t{i}")
            params.update({f"s{i}": s, f"t{i}": t})
        if not ranges:
            return [], None
    elif job_type:
        for i, t in enumerate(dict.fromkeys(job_type)):
            ranges.append(f"job_type = :t{i}")
            params[f"t{i}"] = t
    else:
        ranges.append("TRUE")
    if ids is not None:  # an id prefix: a range of the primary key
        after = " AND ".join(filter(None, [
            after, "job_id BETWEEN CAST(:id_low AS uuid) AND CAST(:id_high AS uuid)"]))
        params.update(id_low=ids[0], id_high=ids[1])
    order = "ORDER BY created_at DESC, job_id DESC LIMIT :limit"
    branches = [f"(SELECT * FROM jobs WHERE {w}{' AND ' + after if after else ''} {order})"
                for w in ranges]
    sql = branches[0] if len(branches) == 1 else f"{' UNION ALL '.join(branches)} {order}"
    rows = rows_as_dicts(conn, conn.run(sql, **params))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["job_id"])
    return rows, next_cursor


def claim(conn: Connection, job_id: str, lease_seconds: float,
          concurrency: tuple[str, int] | None = None,
          rate: tuple[str, RateLimit] | None = None) -> dict[str, Any] | None:
    """QUEUED/RETRYING -> IN_PROGRESS, counting the attempt before the handler runs.

    With `concurrency` = (job type, limit), a job whose type already runs `limit` attempts
    is not claimed but put back to wait a second (the sweeper re-enqueues it). With `rate`
    = (job type, limit), a job over the rate is not claimed but given the bucket's next
    slot and put back to wait for it (see `common.ratelimits`); neither counts an attempt.
    """
    if concurrency is not None:
        job_type, limit = concurrency
        # Serialise claims of this type so two workers cannot both take the last slot.
        conn.run("SELECT pg_advisory_xact_lock(hashtext(:t))", t=job_type)
        running = conn.run("SELECT count(*) FROM jobs WHERE status = 'IN_PROGRESS'"
                           " AND job_type = :t", t=job_type)[0][0]
        if running >= limit:
            # Only a due job is put back: an early or duplicate delivery of one waiting for
            # its backoff or its reserved rate slot must not pull it forward.
            conn.run("UPDATE jobs SET next_attempt_at = now() + interval '1 second',"
                     " published_at = NULL WHERE job_id = CAST(:id AS uuid)"
                     " AND status IN ('QUEUED', 'RETRYING')"
                     " AND (next_attempt_at IS NULL OR next_attempt_at <= now())", id=job_id)
            return None
    if rate is not None:
        # The job first, locked: a duplicate delivery, or one before the job is due,
        # takes no token. A job holding a reserved slot (now due) takes none either.
        waiting = conn.run("SELECT rate_slot_at IS NOT NULL FROM jobs"
                           " WHERE job_id = CAST(:id AS uuid) AND status IN ('QUEUED', 'RETRYING')"
                           " AND (next_attempt_at IS NULL OR next_attempt_at <= now()) FOR UPDATE",
                           id=job_id)
        if not waiting:
            return None
        slot = None if waiting[0][0] else ratelimits.take_slot(conn, *rate)
        if slot is not None:
            conn.run("UPDATE jobs SET next_attempt_at = CAST(:slot AS timestamptz),"
                     " rate_slot_at = CAST(:slot AS timestamptz), published_at = NULL"
                     " WHERE job_id = CAST(:id AS uuid)", id=job_id, slot=slot)
            return None
    sql, params = claim_sql(job_id, lease_seconds)
    rows = rows_as_dicts(conn, conn.run(sql, **params))
    return rows[0] if rows else None


def finish_attempt(conn: Connection, job_id: str, attempt: int, outcome: str,
                   error: str | None) -> None:
    conn.run("UPDATE job_attempts SET finished_at = now(), outcome = :o, error = :e"
             " WHERE job_id = CAST(:id AS uuid) AND attempt = :n",
             id=job_id, n=attempt, o=outcome, e=error)


def attempt_history(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    rows = rows_as_dicts(conn, conn.run(
        "SELECT attempt, started_at, finished_at, outcome, error FROM job_attempts"
        " WHERE job_id = CAST(:id AS uuid) ORDER BY attempt", id=job_id))
    return [{**r, "started_at": _iso(r["started_at"]), "finished_at": _iso(r["finished_at"])}
            for r in rows]


def cache_rows(db: Database, cache: StatusCache, rows: list[dict[str, Any]], *,
               announce: bool = True) -> list[dict[str, Any]]:
    """The rows' job documents; the final ones (COMPLETED, CANCELLED) are also written to
    the cache, the only documents it serves (see `api.job_document`), and the others are
    announced to whoever watches those jobs (the gateway's event streams), unless
    `announce` is False (a submit: nobody can watch a job before it exists). If Redis
    cannot take the final ones, a repair is queued in PostgreSQL so the sweeper writes
    them later; an announcement lost meanwhile is made up for by the streams' own reads."""
    docs = [document(row) for row in rows]
    final = [(row, doc) for row, doc in zip(rows, docs, strict=True)
             if is_final(doc)]
    changes = [doc for doc in docs if not is_final(doc)] if announce else []
    if not final:
        if changes:
            cache.put([], announce=changes)
        return docs
    if cache.put([doc for _, doc in final], announce=changes):
        return docs
    try:
        db.run("INSERT INTO cache_repairs (job_id) SELECT unnest(CAST(:ids AS uuid[]))"
               " ON CONFLICT DO NOTHING", ids=[str(row["job_id"]) for row, _ in final])
    except Exception as exc:  # PostgreSQL down too: nothing more we can do here
        log.warning("could not queue a cache repair for %d job(s): %s", len(final), exc)
    return docs


def repair_cache(db: Database, cache: StatusCache, limit: int = 1000) -> int:
    """Write the documents of jobs whose cache write failed; returns how many."""
    if not cache.available:
        return 0
    with db.transaction() as conn:
        rows = rows_as_dicts(conn, conn.run(
            "SELECT jobs.* FROM cache_repairs JOIN jobs USING (job_id)"
            " ORDER BY cache_repairs.queued_at LIMIT :limit"
            " FOR UPDATE OF cache_repairs SKIP LOCKED", limit=limit))
        if not rows or not cache.put([document(row) for row in rows]):
            return 0
        # Forget a repair only if the job has not moved on since we read it: a newer
        # state whose own cache write failed meanwhile must still be repaired.
        conn.run("DELETE FROM cache_repairs r USING jobs j, unnest(CAST(:ids AS uuid[]),"
                 " CAST(:versions AS bigint[])) AS w(id, v) WHERE r.job_id = w.id"
                 " AND j.job_id = w.id AND j.version <= w.v",
                 ids=[str(row["job_id"]) for row in rows],
                 versions=[row["version"] for row in rows])
    return len(rows)


def request_cancel(conn: Connection, job_id: str) -> dict[str, Any] | None:
    """Flag a running job for cancellation; its worker tells the handler through its context."""
    rows = rows_as_dicts(conn, conn.run(
        "UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, now()),"
        " version = version + 1, updated_at = now()"
        " WHERE job_id = CAST(:id AS uuid) AND status = 'IN_PROGRESS' RETURNING *", id=job_id))
    return rows[0] if rows else None


def record_progress(conn: Connection, job_id: str, attempt: int, fraction: float,
                    message: str | None) -> dict[str, Any] | None:
    """Store a running attempt's progress (not a state change: the status stays IN_PROGRESS)."""
    rows = rows_as_dicts(conn, conn.run(
        "UPDATE jobs SET progress = :p, progress_message = :m, version = version + 1,"
        " updated_at = now() WHERE job_id = CAST(:id AS uuid) AND attempts = :n"
        " AND status = 'IN_PROGRESS' RETURNING *",
        id=job_id, n=attempt, p=fraction, m=message))
    return rows[0] if rows else None


def recent(conn: Connection, limit: int, status: str | None = None) -> list[dict[str, Any]]:
    """The most recently changed jobs (optionally of one status)."""
    where = "WHERE status = CAST(:status AS job_status)" if status else ""
    return rows_as_dicts(conn, conn.run(
        f"SELECT * FROM jobs {where} ORDER BY updated_at DESC LIMIT :limit",
        limit=limit, **({"status": status} if status else {})))


_CLAIM_EXPRESSIONS = {
    "attempts": "attempts + 1",
    "retries": "retries + CASE WHEN status = 'RETRYING' THEN 1 ELSE 0 END",
    "lease_expires_at": "now() + make_interval(secs => :lease)",
    "next_attempt_at": "NULL",
    "rate_slot_at": "NULL",  # a slot reserved by the rate limit is used by this attempt
}


def claim_sql(job_id: str, lease_seconds: float) -> tuple[str, dict[str, Any]]:
    """`claim` as one statement (the move and the attempt row), for group commits."""
    update, params = transition_sql(
        job_id, S.IN_PROGRESS, expressions=_CLAIM_EXPRESSIONS,
        where="(next_attempt_at IS NULL OR next_attempt_at <= now())",
        params={"lease": float(lease_seconds)})
    return (f"WITH moved AS ({update}), attempt AS (INSERT INTO job_attempts (job_id, attempt)"
            " SELECT job_id, attempts FROM moved ON CONFLICT DO NOTHING) SELECT * FROM moved",
            params)


def claim_many_sql(job_ids: list[str], lease_seconds: float) -> tuple[str, dict[str, Any]]:
    """`claim_sql` for many jobs in one statement; returns the rows of those claimed."""
    update, params = transition_many_sql(
        S.IN_PROGRESS, {"id": job_ids}, expressions=_CLAIM_EXPRESSIONS,
        where="(jobs.next_attempt_at IS NULL OR jobs.next_attempt_at <= now())",
        params={"lease": float(lease_seconds)})
    return (f"WITH moved AS ({update}), attempt AS (INSERT INTO job_attempts (job_id, attempt)"
            " SELECT job_id, attempts FROM moved ON CONFLICT DO NOTHING) SELECT * FROM moved",
            params)


def complete_many_sql(done: list[tuple[str, int, Any]]) -> tuple[str, dict[str, Any]]:
    """IN_PROGRESS -> COMPLETED for many (job id, attempt, result), with their attempt rows,
    in one statement; returns the rows of those moved (an attempt that lost its job is left
    out)."""
    update, params = transition_many_sql(
        S.COMPLETED, {"id": [d[0] for d in done], "attempt": [d[1] for d in done],
                      "result": [d[2] for d in done]},
        sources=[S.IN_PROGRESS], values={"result_json": "result"},
        expressions={"lease_expires_at": "NULL", "error_message": "NULL"})
    return (f"WITH moved AS ({update}), finished AS (UPDATE job_attempts SET finished_at = now(),"
            " outcome = 'COMPLETED', error = NULL FROM moved WHERE job_attempts.job_id ="
            " moved.job_id AND job_attempts.attempt = moved.attempts) SELECT * FROM moved",
            params)


def get_jobs(conn: Connection, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The rows of those of `job_ids` that exist, by job id."""
    rows = rows_as_dicts(conn, conn.run(
        "SELECT * FROM jobs WHERE job_id = ANY(CAST(:ids AS uuid[]))", ids=job_ids))
    return {str(row["job_id"]): row for row in rows}
