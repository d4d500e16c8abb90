"""Kafka-triggered processing end to end: retries, dead letters, replay, poison records."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from common.db import Database
from tests.support.client import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def db(database_url):
    database = Database(database_url)
    yield database
    database.close()


def dlq_messages(bootstrap: str, ce_id: str, timeout: float = 20) -> list:
    """Every job-dlq record whose ce_id is `ce_id` (read from the start, own group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        parts = consumer.list_topics("job-dlq", timeout=10).topics["job-dlq"].partitions
        tps = [TopicPartition("job-dlq", p, 0) for p in parts]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        consumer.assign(tps)
        found, positions = [], {p: 0 for p in ends}
        deadline = time.monotonic() + timeout
        while any(positions[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                if msg.error():
                    continue
                positions[msg.partition()] = msg.offset() + 1
                headers = dict(msg.headers() or [])
                if headers.get("ce_id", b"").decode() == ce_id:
                    found.append(msg)
        return found
    finally:
        consumer.close()


def test_a_job_that_fails_twice_completes_on_its_third_attempt(api):
    job = api.wait_status(api.submit("FLAKY", {"failures": 2}).json["job_id"])
    assert job["status"] == "COMPLETED"
    assert job["retries"] == 2 and job["attempts"] == 3
    assert job["result"] == {"succeeded_on_attempt": 3}


def test_a_job_that_keeps_failing_is_dead_lettered_after_three_retries(api, db, stack):
    job_id = api.submit("ALWAYS_FAIL").json["job_id"]
    job = api.wait_status(job_id)
    assert job["status"] == "DEAD_LETTER"
    assert job["retries"] == 3 and job["attempts"] == 4
    assert "always fails (attempt 4)" in job["error_message"]
    outcomes = db.run("SELECT attempt, outcome FROM job_attempts WHERE job_id = CAST(:id AS uuid)"
                      " ORDER BY attempt", id=job_id)
    assert outcomes == [[1, "FAILED"], [2, "FAILED"], [3, "FAILED"], [4, "FAILED"]]
    letters = db.run("SELECT dead_letter_id, reason FROM dead_letters WHERE job_id ="
                     " CAST(:id AS uuid)", id=job_id)
    assert letters == [[f"{job_id}:4", "retries exhausted"]]
    messages = dlq_messages(stack.env["KAFKA_BOOTSTRAP_SERVERS"], f"{job_id}:4")
    assert len(messages) == 1
    body = json.loads(messages[0].value())
    assert body["job_id"] == job_id and len(body["history"]) == 4
    listed = api.request("GET", "/dead-letters?limit=200").json["items"]
    assert any(item["job_id"] == job_id for item in listed)


def test_a_dead_letter_can_be_replayed_with_a_fresh_budget_and_its_history_kept(api, db):
    job_id = api.wait_status(api.submit("FLAKY", {"failures": 1}, max_retries=0)
                             .json["job_id"])["job_id"]
    assert api.job(job_id)["status"] == "DEAD_LETTER"
    replay = api.request("POST", f"/jobs/{job_id}/retry")
    assert replay.status == 202 and replay.json["status"] == "QUEUED"
    assert replay.json["retries"] == 0
    job = api.wait_status(job_id, "COMPLETED")
    assert job["attempts"] == 2 and job["result"] == {"succeeded_on_attempt": 2}
    assert db.run("SELECT count(*) FROM job_attempts WHERE job_id = CAST(:id AS uuid)",
                  id=job_id) == [[2]]
    assert db.run("SELECT replayed_at IS NOT NULL FROM dead_letters WHERE job_id ="
                  " CAST(:id AS uuid)", id=job_id) == [[True]]
    again = api.request("POST", f"/jobs/{job_id}/retry")
    assert again.status == 409 and again.content_type == "application/problem+json"
    assert api.request("POST", f"/jobs/{uuid.uuid4()}/retry").status == 404


def test_a_permanent_error_skips_the_retries(api):
    job = api.wait_status(api.submit("PERMANENT_FAIL").json["job_id"])
    assert job["status"] == "DEAD_LETTER" and job["retries"] == 0 and job["attempts"] == 1
    assert "PermanentError" in job["error_message"]


def test_a_handler_past_its_time_limit_counts_as_a_failed_attempt(api, db):
    job_id = api.submit("SLOW", {"seconds": 30}, max_retries=1).json["job_id"]
    job = api.wait_status(job_id, timeout=60)
    assert job["status"] == "DEAD_LETTER" and job["attempts"] == 2
    assert "time limit" in job["error_message"]


def test_a_poison_record_is_dead_lettered_and_the_next_record_still_flows(api, db, stack):
    marker = f"poison-{uuid.uuid4()}"
    producer = Producer({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP_SERVERS"]})
    for partition in range(4):  # whichever partition the next job lands on holds poison first
        producer.produce("job-queue", value=f"not json {marker}".encode(), partition=partition)
    producer.flush(10)
    job = api.wait_status(api.submit("ECHO", {"message": "after poison"}).json["job_id"])
    assert job["status"] == "COMPLETED"

    def recorded():
        rows = db.run("SELECT reason FROM dead_letters WHERE dead_letter_id LIKE 'record:%'"
                      " AND last_error LIKE '%not a JSON object%'")
        return rows if len(rows) >= 4 else None

    rows = wait_for(recorded, 30, "the 4 poison records to be recorded")
    assert {r[0] for r in rows} == {"undeliverable record (HTTP 400)"}


def test_a_message_lost_between_commit_and_publish_is_published_by_the_sweeper(api, db):
    job_id = str(uuid.uuid4())
    db.run("INSERT INTO jobs (job_id, job_type, payload_json, updated_at) VALUES"
           " (CAST(:id AS uuid), 'ECHO', CAST(:p AS jsonb), now() - interval '1 minute')",
           id=job_id, p=json.dumps({"message": "never published"}))
    job = api.wait_status(job_id)
    assert job["status"] == "COMPLETED" and job["result"]["echo"] == "never published"
