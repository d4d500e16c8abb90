"""Per-type rate limits on the real stack: starts are spaced by the limit across every
worker, and a job over the limit waits for its slot without spending an attempt."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from common import jobs
from common.db import Database
from common.ratelimits import RateLimit

pytestmark = pytest.mark.integration
SLACK = 0.001  # PostgreSQL keeps microseconds; the limiter's arithmetic is exact to them


@pytest.fixture(scope="module")
def db(database_url):
    database = Database(database_url)
    yield database
    database.close()


def run_batch(api, job_type: str, n: int, payload: dict | None = None) -> list[str]:
    reply = api.request("POST", "/jobs/batch", json_body={
        "jobs": [{"job_type": job_type, "payload": payload or {}}] * n})
    assert reply.status == 202, reply.body
    ids = [job["job_id"] for job in reply.json["jobs"]]
    for job_id in ids:
        assert api.wait_status(job_id, timeout=90)["status"] == "COMPLETED"
    return ids


def attempts_of(db: Database, ids: list[str]) -> list[tuple[str, int, datetime, datetime]]:
    """(job id, attempt, started, finished) of every attempt of `ids`, by start time."""
    return [tuple(row) for row in db.run(
        "SELECT job_id::text, attempt, started_at, finished_at FROM job_attempts"
        " WHERE job_id = ANY(CAST(:ids AS uuid[])) ORDER BY started_at", ids=ids)]


def assert_no_attempt_spent_waiting(db: Database, ids: list[str]) -> None:
    rows = db.run("SELECT attempts, retries, rate_slot_at FROM jobs"
                  " WHERE job_id = ANY(CAST(:ids AS uuid[]))", ids=ids)
    assert len(rows) == len(ids)
    assert all(row == [1, 0, None] for row in rows), rows
    assert sorted(a[0] for a in attempts_of(db, ids)) == sorted(ids), "one attempt per job"


def assert_spaced(starts: list[datetime], count: int, interval: float) -> None:
    """The k-th start is at least (k - count + 1) intervals after the first: a burst of
    `count`, then one per interval."""
    for k, start in enumerate(starts):
        gap = (start - starts[0]).total_seconds()
        assert gap >= (k - count + 1) * interval - SLACK, \
            f"start {k} came {gap:.3f}s after the first: over the limit"


def test_twenty_jobs_of_a_type_limited_to_5_a_second_take_at_least_3_seconds(api, db):
    ids = run_batch(api, "RATE_LIMITED", 20)
    starts = [started for _, _, started, _ in attempts_of(db, ids)]
    assert len(starts) == 20
    assert (starts[-1] - starts[0]).total_seconds() >= 3.0 - SLACK
    assert_spaced(starts, 5, 0.2)
    assert_no_attempt_spent_waiting(db, ids)


def test_a_rate_limit_and_a_concurrency_limit_hold_together(api, db):
    ids = run_batch(api, "RATE_AND_CONCURRENCY", 8, {"seconds": 0.05})
    # The handlers' own times: an attempt row's started_at is its claim transaction's
    # start, which may precede a wait for the type's lock.
    spans = sorted(tuple(result["ran"]) for [result] in db.run(
        "SELECT result_json FROM jobs WHERE job_id = ANY(CAST(:ids AS uuid[]))", ids=ids))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, "two attempts ran at once under concurrency=1"
    assert_spaced([started for _, _, started, _ in attempts_of(db, ids)], 4, 0.25)
    assert_no_attempt_spent_waiting(db, ids)


def test_a_deferred_job_claims_on_its_reserved_slot_and_an_early_delivery_takes_no_token(db):
    """`jobs.claim` as `process` calls it, at one start an hour: the second job is given
    the next slot; its deliveries before then take nothing; at its slot it starts without
    another token; the third is given the slot after it."""
    job_type, limit = f"UNIT_RATE_{uuid.uuid4().hex[:8]}", RateLimit(1, 3600.0)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    db.run("INSERT INTO jobs (job_id, job_type, payload_json) SELECT id, :t, '{}'"
           " FROM unnest(CAST(:ids AS uuid[])) AS id", ids=ids, t=job_type)

    def claim(job_id: str) -> dict | None:
        with db.transaction() as conn:  # leased an hour: the sweeper leaves them alone
            return jobs.claim(conn, job_id, 3600, rate=(job_type, limit))

    def state(job_id: str) -> list:
        [row] = db.run("SELECT status::text, attempts, rate_slot_at, next_attempt_at,"
                       " published_at FROM jobs WHERE job_id = CAST(:id AS uuid)", id=job_id)
        return row

    def bucket() -> datetime:
        return db.run("SELECT tat FROM rate_limits WHERE job_type = :t", t=job_type)[0][0]

    try:
        first = claim(ids[0])
        assert first is not None and first["attempts"] == 1
        [[started]] = db.run("SELECT started_at FROM job_attempts WHERE job_id ="
                             " CAST(:id AS uuid)", id=ids[0])
        assert claim(ids[1]) is None
        hour = timedelta(hours=1)
        assert state(ids[1]) == ["QUEUED", 0, started + hour, started + hour, None]
        tat = bucket()
        assert claim(ids[1]) is None and bucket() == tat, "an early delivery took a token"
        db.run("UPDATE jobs SET next_attempt_at = now() - interval '1 second', rate_slot_at ="
               " now() - interval '1 second' WHERE job_id = CAST(:id AS uuid)", id=ids[1])
        second = claim(ids[1])  # its slot has come
        assert second is not None and second["rate_slot_at"] is None
        assert second["attempts"] == 1 and bucket() == tat, "the reserved slot took a token"
        assert claim(ids[2]) is None
        assert state(ids[2])[:3] == ["QUEUED", 0, started + 2 * hour]
    finally:
        db.run("DELETE FROM jobs WHERE job_id = ANY(CAST(:ids AS uuid[]))", ids=ids)
        db.run("DELETE FROM rate_limits WHERE job_type = :t", t=job_type)


def test_a_delivery_at_the_concurrency_limit_never_pulls_a_waiting_job_forward(db):
    """A job waiting for its slot (or its backoff) keeps its time when a duplicate
    delivery finds its type at the concurrency limit: it is not put back to a second
    from now, where it would start early."""
    job_type = f"UNIT_CONC_{uuid.uuid4().hex[:8]}"
    ids = [str(uuid.uuid4()) for _ in range(2)]
    db.run("INSERT INTO jobs (job_id, job_type, payload_json, next_attempt_at) VALUES"
           " (CAST(:a AS uuid), :t, '{}', NULL),"
           " (CAST(:b AS uuid), :t, '{}', now() + interval '1 hour')",
           a=ids[0], b=ids[1], t=job_type)
    try:
        with db.transaction() as conn:
            assert jobs.claim(conn, ids[0], 3600, concurrency=(job_type, 1)) is not None
        [[before]] = db.run("SELECT next_attempt_at FROM jobs WHERE job_id = CAST(:id AS uuid)",
                            id=ids[1])
        with db.transaction() as conn:  # the type is at its limit: not claimed
            assert jobs.claim(conn, ids[1], 3600, concurrency=(job_type, 1)) is None
        [[after]] = db.run("SELECT next_attempt_at FROM jobs WHERE job_id = CAST(:id AS uuid)",
                           id=ids[1])
        assert after == before, "an early delivery pulled the waiting job forward"
    finally:
        db.run("DELETE FROM jobs WHERE job_type = :t", t=job_type)
