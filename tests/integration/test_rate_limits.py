"""Per-type rate limits on the real stack: starts are spaced by the limit across every
worker, and a job over the limit waits for its slot without spending an attempt."""

from __future__ import annotations

from datetime import datetime

import pytest

from common.db import Database

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
