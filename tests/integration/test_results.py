"""What a handler may return, and a lost worker's job that was asked to stop."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.integration


def test_a_result_over_the_size_limit_or_not_json_dead_letters_the_job_saying_why(api):
    big = api.submit("BIG_RESULT", {"bytes": 2 << 20}).json["job_id"]
    odd = api.submit("BIG_RESULT", {"kind": "set"}).json["job_id"]
    ok = api.submit("BIG_RESULT", {"bytes": 1000}).json["job_id"]
    doc = api.wait_status(big)
    assert doc["status"] == "DEAD_LETTER" and doc["attempts"] == 1  # permanent: no retry
    assert "over JOBS_MAX_RESULT_BYTES (1048576)" in doc["error_message"]
    assert doc["result"] is None
    doc = api.wait_status(odd)
    assert doc["status"] == "DEAD_LETTER" and "not JSON" in doc["error_message"]
    assert api.wait_status(ok)["result"] == "x" * 1000


def test_a_job_asked_to_stop_whose_worker_died_ends_cancelled_not_failed(
        database_url, function_env):
    from common import clients
    from common.db import Database
    from common.sweeper import reclaim_expired

    job_id = str(uuid.uuid4())
    db = Database(database_url)
    try:
        db.run("INSERT INTO jobs (job_id, job_type, payload_json, status, attempts,"
               " lease_expires_at, cancel_requested_at) VALUES (CAST(:id AS uuid), 'NOOP',"
               " '{}', 'IN_PROGRESS', 1, now() - interval '1 second', now())", id=job_id)
        db.run("INSERT INTO job_attempts (job_id, attempt) VALUES (CAST(:id AS uuid), 1)",
               id=job_id)
        reclaim_expired(db, clients.cache(), clients.publisher(), clients.settings())
        [[status, message, outcome]] = db.run(
            "SELECT j.status::text, j.error_message, a.outcome FROM jobs j JOIN job_attempts a"
            " USING (job_id) WHERE j.job_id = CAST(:id AS uuid)", id=job_id)
        assert (status, outcome) == ("CANCELLED", "CANCELLED")
        assert "cancelled" in message
    finally:
        db.run("DELETE FROM jobs WHERE job_id = CAST(:id AS uuid)", id=job_id)
        db.close()
