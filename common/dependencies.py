"""Dependencies between jobs: a job waits (WAITING) until every parent has COMPLETED.

- Submit (`create_with_parents`) locks the parents that already exist, marks them
  `has_dependents`, and inserts the children WAITING (QUEUED if every parent has already
  completed), with one `job_dependencies` row per edge, in one transaction. A parent that
  ends later then carries the mark into its final write, whoever makes it.
- When a job with dependents reaches a final state, a trigger (migration 0008) queues it in
  `job_settlements` in the same transaction. `settle` takes those rows: the waiting
  children of a COMPLETED parent whose parents have all completed become QUEUED (and are
  published); those of a DEAD_LETTER or CANCELLED parent become CANCELLED with
  `cancelled_by` naming it, which queues their own dependents in turn. The function that
  wrote the outcome calls it at once; the sweeper takes whatever is left.
- `revive` (replay with `with_dependents=true`) brings jobs cancelled by a parent's failure
  back to WAITING, their own cancelled dependents with them.

Two parents of one child completing at once: each settlement locks the waiting child
before reading its parents, so the later one reads the earlier one's commit.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from common import callbacks, jobs, metrics
from common.cache import StatusCache
from common.db import Connection, Database, rows_as_dicts
from common.errors import ApiError
from common.lifecycle import transition_many_sql
from common.models import JobStatus
from common.queue import Publisher, job_event, job_topic
from common.settings import Settings

log = logging.getLogger(__name__)
S = JobStatus
FAILED = frozenset({S.DEAD_LETTER.value, S.CANCELLED.value})
MAX_ROUNDS = 100  # cancellations passed down per call; deeper ones wait for the next call

Item = tuple[Any, dict[str, Any], str | None, int, str | None]  # see jobs.create_jobs


def check_references(submissions: list[Any], batch: bool) -> None:
    """422 for a `depends_on` that can never be satisfied: an index outside a batch, an
    index of the item itself or of a later one (the only way to make a cycle: a new job
    can never be the parent of one that exists already)."""
    for i, sub in enumerate(submissions):
        where = f"jobs[{i}].depends_on" if batch else "depends_on"
        for ref in sub.depends_on or ():
            if isinstance(ref, int) and not batch:
                raise ApiError(422, "Bad dependency", f"{where}: {ref} is an index; indexes"
                               " name earlier items of a batch (POST /jobs/batch), here give"
                               " job ids")
            if isinstance(ref, int) and ref >= i:
                raise ApiError(422, "Dependency cycle", f"{where}: item {ref} is not an"
                               f" earlier item of the batch; a job can only depend on items"
                               f" before it (0-{i - 1}), so that there is no cycle"
                               if i else f"{where}: the first item cannot depend on an index")


def create_with_parents(db: Database, items: list[Item], submitted_by: str | None
                        ) -> list[tuple[dict[str, Any], bool]]:
    """Insert jobs of which some have parents (see the module's doc); (row, created) each."""
    ids = [str(uuid.uuid4()) for _ in items]
    parents: list[list[str]] = []
    for sub, *_ in items:
        refs = [ids[ref] if isinstance(ref, int) else str(ref) for ref in sub.depends_on or ()]
        parents.append(list(dict.fromkeys(refs)))
    in_batch = set(ids)
    outside = sorted({p for refs in parents for p in refs} - in_batch)
    with db.transaction() as conn:
        found = dict(conn.run(
            "SELECT job_id::text, status::text FROM jobs WHERE job_id = ANY(CAST(:ids AS"
            " uuid[])) ORDER BY job_id FOR NO KEY UPDATE", ids=outside))
        unknown = [p for p in outside if p not in found]
        if unknown:
            raise ApiError(422, "Unknown parent",
                           f"{_where(items, unknown[0])} names no job {unknown[0]}")
        failed = [p for p in outside if found[p] in FAILED]
        if failed:
            state = found[failed[0]]
            why = ("replay it first" if state == S.DEAD_LETTER.value
                   else "a cancelled job never runs again")
            raise ApiError(422, "Parent will never complete",
                           f"{_where(items, failed[0])} names job {failed[0]}, which is {state}:"
                           f" a job depending on it would never run ({why})")
        conn.run("UPDATE jobs SET has_dependents = true WHERE job_id = ANY(CAST(:ids AS"
                 " uuid[])) AND NOT has_dependents", ids=outside)
        referenced = {p for refs in parents for p in refs}
        graph = jobs.Graph(
            ids=ids,
            statuses=[S.WAITING.value if any(found.get(p) != S.COMPLETED.value for p in refs)
                      else S.QUEUED.value for refs in parents],
            parents=parents, has_dependents=[i in referenced for i in ids])
        created = jobs.create_jobs(db, items, submitted_by=submitted_by, conn=conn,
                                   graph=graph)
        edges = [(p, str(row["job_id"])) for (row, new), refs in zip(created, parents,
                                                                     strict=True)
                 if new for p in refs]
        if edges:
            conn.run("INSERT INTO job_dependencies (parent_id, child_id) SELECT * FROM"
                     " unnest(CAST(:ps AS uuid[]), CAST(:cs AS uuid[])) ON CONFLICT DO NOTHING",
                     ps=[p for p, _ in edges], cs=[c for _, c in edges])
    return created


def _where(items: list[Item], parent: str) -> str:
    """`jobs[i].depends_on` of the first batch item naming `parent`, else `depends_on`."""
    if len(items) > 1:
        for i, (sub, *_) in enumerate(items):
            if any(str(ref) == parent for ref in sub.depends_on or ()):
                return f"jobs[{i}].depends_on"
    return "depends_on"


_TAKE = """
WITH taken AS (
    DELETE FROM job_settlements WHERE job_id IN (
        SELECT job_id FROM job_settlements {where} ORDER BY queued_at LIMIT :limit
        FOR UPDATE SKIP LOCKED)
    RETURNING job_id)
SELECT jobs.job_id::text, jobs.status::text FROM taken JOIN jobs USING (job_id)
"""

# Every parent of the child being moved has completed (read after the child is locked).
_ALL_PARENTS_DONE = ("NOT EXISTS (SELECT 1 FROM job_dependencies d JOIN jobs p"
                     " ON p.job_id = d.parent_id WHERE d.child_id = jobs.job_id"
                     " AND p.status <> 'COMPLETED')")


def settle(db: Database, cache: StatusCache, publisher: Publisher, settings: Settings,
           job_ids: list[str] | None = None, limit: int = 500) -> int:
    """Settle the dependents of ended jobs queued in `job_settlements` (those of `job_ids`,
    or the oldest `limit`); returns how many dependents moved."""
    released: list[dict[str, Any]] = []
    cancelled: list[dict[str, Any]] = []
    with db.transaction() as conn:
        pending: list[str] | None = job_ids
        for _ in range(MAX_ROUNDS):
            where = "" if pending is None else "WHERE job_id = ANY(CAST(:ids AS uuid[]))"
            ended = dict(conn.run(_TAKE.format(where=where), limit=limit,
                                  **({} if pending is None else {"ids": pending})))
            if not ended:
                break
            moved = _settle_round(conn, ended)
            released += [r for r in moved if r["status"] == S.QUEUED.value]
            down = [r for r in moved if r["status"] == S.CANCELLED.value]
            cancelled += down
            # The cancelled ones' own dependents were queued by the trigger just now.
            pending = [str(r["job_id"]) for r in down if r["has_dependents"]]
            if not pending:
                break
    if not released and not cancelled:
        return 0
    jobs.cache_rows(db, cache, released + cancelled)
    for row in cancelled:
        metrics.CANCELLED.labels(row["job_type"]).inc()
        log.info("job %s cancelled: %s", row["job_id"], row["error_message"])
    publish_released(db, publisher, settings, released)
    return len(released) + len(cancelled)


def _settle_round(conn: Connection, ended: dict[str, str]) -> list[dict[str, Any]]:
    """Move the waiting children of `ended` (job id -> status); their new rows."""
    children = conn.run(
        "SELECT c.job_id::text, d.parent_id::text FROM job_dependencies d JOIN jobs c"
        " ON c.job_id = d.child_id WHERE d.parent_id = ANY(CAST(:ids AS uuid[]))"
        " AND c.status = 'WAITING' ORDER BY c.job_id, d.parent_id FOR NO KEY UPDATE OF c",
        ids=list(ended))
    doomed: dict[str, str] = {}  # child -> the failed parent that cancels it
    ready: set[str] = set()
    for child, parent in children:
        if ended[parent] in FAILED:
            doomed.setdefault(child, parent)
        elif ended[parent] == S.COMPLETED.value:
            ready.add(child)
    moved: list[dict[str, Any]] = []
    if doomed:
        order = sorted(doomed)
        sql, params = transition_many_sql(
            S.CANCELLED, {"id": order, "parent": [doomed[c] for c in order],
                          "message": [f"parent {doomed[c]} ended {ended[doomed[c]]}"
                                      for c in order]},
            sources=[S.WAITING], values={"cancelled_by": "parent", "error_message": "message"},
            expressions={"next_attempt_at": "NULL"})
        moved += rows_as_dicts(conn, conn.run(sql, **params))
    ready -= doomed.keys()
    if ready:
        sql, params = transition_many_sql(S.QUEUED, {"id": sorted(ready)}, sources=[S.WAITING],
                                          where=_ALL_PARENTS_DONE,
                                          expressions={"published_at": "NULL"})
        moved += rows_as_dicts(conn, conn.run(sql, **params))
    return moved


ENDED = frozenset({S.COMPLETED.value, S.DEAD_LETTER.value, S.CANCELLED.value})


def follow_up(db: Database, cache: StatusCache, publisher: Publisher, settings: Settings,
              rows: list[dict[str, Any]]) -> None:
    """What follows jobs' final states, already committed and queued by the database: their
    dependents settled now, their callbacks sent in the background. What fails here is the
    sweeper's to do."""
    ended = [r for r in rows if r["status"] in ENDED]
    parents = [str(r["job_id"]) for r in ended if r["has_dependents"]]
    if parents:
        try:
            settle(db, cache, publisher, settings, parents)
        except Exception as exc:  # noqa: BLE001 - still queued in job_settlements
            log.warning("dependents of %d job(s) not settled now (%s); the sweeper will",
                        len(parents), exc)
    called = [str(r["job_id"]) for r in ended if r["callback_url"]]
    if called:
        callbacks.deliver_soon(db, settings, called)


def publish_released(db: Database, publisher: Publisher, settings: Settings,
                     rows: list[dict[str, Any]]) -> None:
    """Put released jobs on the queue (a delayed one waits for its `run_at`: the sweeper's);
    one not published now is published by the sweeper from PostgreSQL."""
    due = [row for row in rows if row["next_attempt_at"] is None]
    if not due:
        return
    events = [job_event(job_topic(settings, row["job_type"]), str(row["job_id"]), row["job_type"],
                        ce_id=f"{row['job_id']}:released-{row['version']}",
                        source="/jobs/dependencies") for row in due]
    try:
        publisher.publish(events)
        jobs.mark_published(db, [(str(row["job_id"]), row["attempts"]) for row in due])
    except Exception as exc:  # noqa: BLE001 - the sweeper publishes them later
        log.warning("released %d job(s) but could not publish them now (%s); the sweeper"
                    " will", len(due), exc)


def revive(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    """CANCELLED -> WAITING for the jobs `job_id`'s failure cancelled, and theirs, and so on
    (replay `with_dependents=true`). Any other failed parent of theirs is queued for
    settlement, which cancels them again: they only wait for parents that can complete."""
    revived: list[dict[str, Any]] = []
    causes = [job_id]
    for _ in range(MAX_ROUNDS):
        ids = [r[0] for r in conn.run(
            "SELECT job_id::text FROM jobs WHERE cancelled_by = ANY(CAST(:ids AS uuid[]))"
            " AND status = 'CANCELLED' ORDER BY job_id FOR NO KEY UPDATE", ids=causes)]
        if not ids:
            break
        sql, params = transition_many_sql(
            S.WAITING, {"id": ids}, sources=[S.CANCELLED],
            expressions={"cancelled_by": "NULL", "error_message": "NULL"},
            where="jobs.cancelled_by IS NOT NULL")
        rows = rows_as_dicts(conn, conn.run(sql, **params))
        revived += rows
        causes = [str(r["job_id"]) for r in rows]
    if revived:
        conn.run("INSERT INTO job_settlements (job_id) SELECT DISTINCT d.parent_id FROM"
                 " job_dependencies d JOIN jobs p ON p.job_id = d.parent_id"
                 " WHERE d.child_id = ANY(CAST(:ids AS uuid[]))"
                 " AND p.status IN ('DEAD_LETTER', 'CANCELLED') ON CONFLICT DO NOTHING",
                 ids=[str(r["job_id"]) for r in revived])
    return revived


def parent_results(db: Database, parents: list[Any]) -> dict[str, Any]:
    """job id -> result of each parent (a handler's `ctx.parent_results`)."""
    with db.connection() as conn:
        return {job_id: result for job_id, result in conn.run(
            "SELECT job_id::text, result_json FROM jobs WHERE job_id = ANY(CAST(:ids AS"
            " uuid[]))", ids=[str(p) for p in parents])}


def dependents(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    """The rows of the jobs that depend on `job_id`, oldest first."""
    return rows_as_dicts(conn, conn.run(
        "SELECT jobs.* FROM job_dependencies d JOIN jobs ON jobs.job_id = d.child_id"
        " WHERE d.parent_id = CAST(:id AS uuid) ORDER BY jobs.created_at, jobs.job_id"
        " LIMIT 1000", id=job_id))
