"""Function tier: each function in-process via functions_framework.create_app(...).test_client(),
against the session's real PostgreSQL, Redis and Kafka; CloudEvents built by the SDK.

`process` answers 200 both when it recorded an attempt's outcome and when it ignored a
delivery (a duplicate, a job claimed elsewhere or already ended), so these tests read the
outcome itself: the job and its attempt rows in PostgreSQL, what was published, the dead
letter. Tests that take the `alone` fixture put the functions' queue and DLQ on topics no
bridge reads, so the test's deliveries are the only ones (the stack's sweeper would
republish a job to the real queue only after 7 s without a publish, 10 s after one: far
longer than such a test).
Where the stack's own bridge does race the test, the combined effect is what is asserted.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from confluent_kafka import Consumer, Message, TopicPartition
from functions_framework import create_app

from common.db import Database, rows_as_dicts
from common.settings import get_settings
from infra.bridge import binary_request
from infra.services import create_topics
from tests.support.client import in_thread, wait_for

pytestmark = pytest.mark.integration
FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"
WAIT = 20.0




def client(name: str, target: str, signature: str = "http"):
    """The function's test client, sending the stack's admin token as a user would."""
    test_client = create_app(target, str(FUNCTIONS / name / "main.py"), signature).test_client()
    test_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {os.environ['JOBS_TOKEN']}"
    return test_client


def job_event(job_id: str, job_type: str, ce_id: str | None = None) -> tuple[dict, bytes]:
    event = CloudEvent({"type": "dev.jobs.job.ready", "source": "/tests", "id": ce_id or job_id},
                       {"job_id": job_id, "job_type": job_type})
    return to_binary(event)


def submit(job_type: str, payload: dict) -> str:
    reply = client("submit", "submit_job").post("/jobs", json={"job_type": job_type,
                                                              "payload": payload})
    assert reply.status_code == 202, reply.json
    return reply.json["job_id"]


def deliver(job_id: str, job_type: str) -> None:
    """One delivery of the job's record to `process_job`, as the KafkaSource makes it."""
    headers, body = job_event(job_id, job_type)
    reply = client("process", "process_job", "cloudevent").post("/", headers=headers, data=body)
    assert reply.status_code == 200, reply.data


def query(database_url: str, sql: str, **params: Any) -> list[dict]:
    db = Database(database_url)
    try:
        with db.connection() as conn:
            return rows_as_dicts(conn, conn.run(sql, **params))
    finally:
        db.close()


def job_row(database_url: str, job_id: str) -> dict:
    [row] = query(database_url, "SELECT status::text, attempts, retries, result_json, version"
                                " FROM jobs WHERE job_id = CAST(:id AS uuid)", id=job_id)
    if isinstance(row["result_json"], str):
        row["result_json"] = json.loads(row["result_json"])
    return row


def attempts_of(database_url: str, job_id: str) -> list[tuple[int, str | None, str | None]]:
    """(attempt, outcome, error) of every attempt row of the job."""
    rows = query(database_url, "SELECT attempt, outcome, error, finished_at IS NOT NULL AS done"
                               " FROM job_attempts WHERE job_id = CAST(:id AS uuid)"
                               " ORDER BY attempt", id=job_id)
    assert all(r["done"] == (r["outcome"] is not None) for r in rows), rows
    return [(r["attempt"], r["outcome"], r["error"]) for r in rows]


def records(bootstrap: str, topic: str) -> list[Message]:
    """Every record on `topic` (one partition), from the start to its end now."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        tp = TopicPartition(topic, 0, 0)
        end = consumer.get_watermark_offsets(tp, timeout=WAIT)[1]
        consumer.assign([tp])
        found: list[Message] = []
        deadline = time.monotonic() + WAIT
        while len(found) < end:
            assert time.monotonic() < deadline, f"read {len(found)} of {end} records"
            found += [m for m in consumer.consume(100, 0.5) if m.error() is None]
        return found
    finally:
        consumer.close()


def ce_ids(env: dict[str, str], topic: str, job_id: str) -> list[str]:
    """The ce_id of every record about `job_id` on `topic`, in order."""
    return [dict(m.headers())["ce_id"].decode()
            for m in records(env["KAFKA_BOOTSTRAP_SERVERS"], env[topic])
            if json.loads(m.value()).get("job_id") == job_id]


@pytest.fixture(scope="module")
def private_topics(stack) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    topics = (f"fn-queue-{suffix}", f"fn-dlq-{suffix}")
    create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], dict.fromkeys(topics, 1))
    return topics


@pytest.fixture
def alone(function_env, private_topics, monkeypatch) -> dict[str, str]:
    """`function_env` with the functions' queue and DLQ on topics of this module's own."""
    queue, dlq = private_topics
    monkeypatch.setenv("JOBS_QUEUE_TOPIC", queue)
    monkeypatch.setenv("JOBS_DLQ_TOPIC", dlq)
    get_settings.cache_clear()
    return {**function_env, "JOBS_QUEUE_TOPIC": queue, "JOBS_DLQ_TOPIC": dlq}


def test_process_has_run_the_handler_and_recorded_the_result_when_it_answers(alone):
    job_id = submit("ECHO", {"message": "from a test client"})
    deliver(job_id, "ECHO")
    # No waiting: the 200 comes after the outcome is committed.
    row = job_row(alone["DATABASE_URL"], job_id)
    assert (row["status"], row["attempts"], row["retries"], row["result_json"]) == (
        "COMPLETED", 1, 0, {"echo": "from a test client", "attempt": 1})
    assert attempts_of(alone["DATABASE_URL"], job_id) == [(1, "COMPLETED", None)]
    status = client("status", "get_job_status").get(f"/jobs/{job_id}").json
    assert (status["status"], status["result"]["echo"]) == ("COMPLETED", "from a test client")


def test_a_record_delivered_by_the_test_and_by_the_stacks_bridge_runs_the_handler_once(
        function_env):
    # Submitted to the real queue: the stack's own bridge and worker race this delivery.
    job_id = submit("ECHO", {"message": "raced"})
    deliver(job_id, "ECHO")
    url = function_env["DATABASE_URL"]
    row = wait_for(lambda: (r := job_row(url, job_id))["status"] == "COMPLETED" and r, WAIT,
                   "the job to complete, here or in the stack's worker")
    assert (row["attempts"], row["retries"]) == (1, 0)
    assert row["result_json"] == {"echo": "raced", "attempt": 1}
    assert attempts_of(url, job_id) == [(1, "COMPLETED", None)]


def test_the_same_record_delivered_four_times_at_once_runs_the_handler_once(alone):
    job_id = submit("SLOW", {"seconds": 0.3})
    headers, body = job_event(job_id, "SLOW", ce_id=f"dup-{uuid.uuid4()}")
    process = create_app("process_job", str(FUNCTIONS / "process" / "main.py"), "cloudevent")

    def post(_):
        return process.test_client().post("/", headers=headers, data=body).status_code

    deliveries = [in_thread(post, n) for n in range(4)]
    assert [d.result(WAIT) for d in deliveries] == [200] * 4
    # Three were answered as duplicates; the fourth ran the handler to its end.
    row = job_row(alone["DATABASE_URL"], job_id)
    assert (row["status"], row["attempts"], row["result_json"]) == (
        "COMPLETED", 1, {"stopped": False})
    assert attempts_of(alone["DATABASE_URL"], job_id) == [(1, "COMPLETED", None)]


def test_each_failed_attempt_is_recorded_before_the_200_and_the_next_delivery_retries_it(alone):
    url = alone["DATABASE_URL"]
    job_id = submit("FLAKY", {"failures": 2})
    for attempt in (1, 2):
        deliver(job_id, "FLAKY")
        row = job_row(url, job_id)
        assert (row["status"], row["attempts"], row["retries"]) == (
            "RETRYING", attempt, attempt - 1)
    deliver(job_id, "FLAKY")
    row = job_row(url, job_id)
    assert (row["status"], row["attempts"], row["retries"], row["result_json"]) == (
        "COMPLETED", 3, 2, {"succeeded_on_attempt": 3})
    history = attempts_of(url, job_id)
    assert [(n, outcome) for n, outcome, _ in history] == [
        (1, "FAILED"), (2, "FAILED"), (3, "COMPLETED")]
    assert history[0][2].startswith("RuntimeError: flaky failure on attempt 1")
    # FLAKY has no backoff: `process` handed each retry to the queue itself.
    assert ce_ids(alone, "JOBS_QUEUE_TOPIC", job_id) == [
        job_id, f"{job_id}:retry-1", f"{job_id}:retry-2"]
    # A late duplicate of the record: answered 200, and nothing runs or changes.
    deliver(job_id, "FLAKY")
    assert job_row(url, job_id) == row
    assert len(attempts_of(url, job_id)) == 3


def test_a_permanent_failure_is_dead_lettered_once_with_one_dlq_message(alone):
    url = alone["DATABASE_URL"]
    job_id = submit("PERMANENT_FAIL", {})
    deliver(job_id, "PERMANENT_FAIL")
    row = job_row(url, job_id)
    assert (row["status"], row["attempts"], row["retries"]) == ("DEAD_LETTER", 1, 0)
    assert attempts_of(url, job_id) == [(1, "FAILED", "PermanentError: this input can never work")]
    letter = [(f"{job_id}:1", "permanent error", "PermanentError: this input can never work")]
    columns = "SELECT dead_letter_id, reason, last_error FROM dead_letters"
    assert [tuple(r.values()) for r in query(url, f"{columns} WHERE job_id = CAST(:id AS uuid)",
                                             id=job_id)] == letter
    [message] = [m for m in records(alone["KAFKA_BOOTSTRAP_SERVERS"], alone["JOBS_DLQ_TOPIC"])
                 if json.loads(m.value())["job_id"] == job_id]
    assert dict(message.headers())["ce_id"].decode() == f"{job_id}:1"
    # `dlq` gets that message (twice: delivery is at least once) and keeps one row.
    headers, body = binary_request(message, "/tests/dlq")
    dlq = client("dlq", "record_dead_letter", "cloudevent")
    for _ in range(2):
        assert dlq.post("/", headers=headers, data=body).status_code == 200
    assert [tuple(r.values()) for r in query(url, f"{columns} WHERE job_id = CAST(:id AS uuid)",
                                             id=job_id)] == letter
    # Delivered again, the dead-lettered job does not run again.
    deliver(job_id, "PERMANENT_FAIL")
    assert job_row(url, job_id) == row


@pytest.mark.parametrize("data,reason", [
    ({"no_job_id": True}, "job_id"),
    ({"job_id": "not-a-uuid", "job_type": "ECHO"}, "job_id"),
    ({"job_id": str(uuid.uuid4()), "job_type": "ECHO"}, "no job"),
])
def test_a_record_no_retry_can_fix_is_refused_with_a_400_and_its_reason(function_env, data,
                                                                        reason):
    headers, body = to_binary(CloudEvent({"type": "t", "source": "/tests", "id": "x"}, data))
    reply = client("process", "process_job", "cloudevent").post("/", headers=headers, data=body)
    assert reply.status_code == 400
    assert reason in reply.json["detail"]


def test_a_record_that_is_not_json_is_refused_with_a_400(function_env):
    headers = {"ce-specversion": "1.0", "ce-id": "garbage", "ce-type": "t", "ce-source": "/t",
               "content-type": "application/octet-stream"}
    reply = client("process", "process_job", "cloudevent").post("/", headers=headers,
                                                                data=b"\x00\xffnot json")
    assert reply.status_code == 400


def test_dlq_records_an_undeliverable_record_once_with_knatives_error_attributes(function_env):
    event_id = f"partition:0/offset:{uuid.uuid4().int % 10**9}"
    event = CloudEvent({"type": "dev.knative.kafka.event", "source": "/tests/dlq", "id": event_id,
                        "knativeerrorcode": "400",
                        "knativeerrordata": base64.b64encode(b"event data is not JSON").decode()},
                       {"whatever": 1})
    headers, body = to_binary(event)
    dlq = client("dlq", "record_dead_letter", "cloudevent")
    assert dlq.post("/", headers=headers, data=body).status_code == 200
    assert dlq.post("/", headers=headers, data=body).status_code == 200
    db = Database(function_env["DATABASE_URL"])
    try:
        rows = db.run("SELECT reason, last_error FROM dead_letters WHERE dead_letter_id = :id",
                      id=f"record:/tests/dlq:{event_id}:{event['time']}")
    finally:
        db.close()
    assert rows == [["undeliverable record (HTTP 400)", "event data is not JSON"]]


def test_submit_answers_problem_json_for_every_kind_of_bad_input(function_env):
    submit_client = client("submit", "submit_job")
    cases = [
        (b"{", "application/json", 400),
        (b"[1]", "application/json", 422),
        (b'{"job_type": "NOPE", "payload": {}}', "application/json", 422),
        (b'{"job_type": "ECHO", "payload": {"message": 5}}', "application/json", 422),
        (b'{"job_type": "ECHO"}', "text/plain", 415),
        (b" ", "application/json", 400),
    ]
    for body, content_type, status in cases:
        reply = submit_client.post("/jobs", data=body, content_type=content_type)
        assert reply.status_code == status, (body, reply.json)
        assert reply.content_type == "application/problem+json"
        assert reply.json["status"] == status and reply.json["detail"]


def test_the_batch_target_answers_each_event_of_a_batch_in_order(alone):
    good = submit("ECHO", {"message": "in a batch"})
    event = {"specversion": "1.0", "type": "t", "source": "/tests",
             "datacontenttype": "application/json", "data": {"job_id": good, "job_type": "ECHO"}}
    batch = [
        {**event, "id": "a"},
        {"specversion": "1.0", "id": "b", "type": "t", "source": "/tests",
         "datacontenttype": "application/json", "data": {"no": "job"}},
        {"specversion": "1.0", "id": "c", "type": "t", "source": "/tests",
         "data_base64": "bm90IGpzb24="},
        {"specversion": "1.0", "id": "d", "source": "/tests", "data": {}},  # no type
        "not an event",
        {**event, "id": "a-again"},  # the same job twice in one batch
    ]
    reply = client("process", "process_job_batch").post(
        "/", json=batch, headers={"Content-Type": "application/cloudevents-batch+json"})
    assert reply.status_code == 200
    assert [(r["id"], r["status"]) for r in reply.json["results"]] == [
        ("a", 200), ("b", 400), ("c", 400), ("d", 400), (None, 400), ("a-again", 200)]
    assert [r["detail"] for r in reply.json["results"] if r["status"] == 200] == [
        "completed", "ignored"]
    assert "not a CloudEvent" in reply.json["results"][3]["detail"]
    row = job_row(alone["DATABASE_URL"], good)
    assert (row["status"], row["attempts"]) == ("COMPLETED", 1)
    assert attempts_of(alone["DATABASE_URL"], good) == [(1, "COMPLETED", None)]


def test_the_batch_target_also_takes_one_binary_mode_event(alone):
    job_id = submit("ECHO", {"message": "single"})
    headers, body = job_event(job_id, "ECHO")
    batch_client = client("process", "process_job_batch")
    reply = batch_client.post("/", headers=headers, data=body)
    assert (reply.status_code, reply.json) == (200, {"outcome": "completed"})
    assert job_row(alone["DATABASE_URL"], job_id)["result_json"] == {"echo": "single",
                                                                     "attempt": 1}
    again = batch_client.post("/", headers=headers, data=body)
    assert (again.status_code, again.json) == (200, {"outcome": "ignored"})
    assert attempts_of(alone["DATABASE_URL"], job_id) == [(1, "COMPLETED", None)]
    bad_headers, bad_body = job_event(str(uuid.uuid4()), "ECHO")
    assert batch_client.post("/", headers=bad_headers, data=bad_body).status_code == 400


def test_a_report_in_object_storage_is_written_by_process_and_streamed_by_status(
        alone, monkeypatch):
    """JOBS_ARTIFACT_URL names object storage (here fsspec's in-memory store, shared by the
    functions this test runs in one process): the report is uploaded whole and the
    download streams it from there."""
    import fsspec

    store = f"memory://jobs-artifacts-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("JOBS_ARTIFACT_URL", store)
    get_settings.cache_clear()
    job_id = submit("REPORT_GENERATION", {"title": "Stored away", "columns": ["a", "b"],
                                          "rows": [[1, "x"], [2, "y"]], "format": "csv"})
    deliver(job_id, "REPORT_GENERATION")
    result = job_row(alone["DATABASE_URL"], job_id)["result_json"]
    key = f"{store.split('://')[1]}/{job_id}/{result['artifact']}"
    stored = fsspec.filesystem("memory").cat_file(key)
    assert len(stored) == result["bytes"] and stored.startswith(b"a,b")
    reply = client("status", "get_job_status").get(f"/jobs/{job_id}/artifact")
    assert reply.status_code == 200 and reply.data == stored
    assert reply.headers["Content-Type"].startswith("text/csv")
    assert result["artifact"] in reply.headers["Content-Disposition"]
    assert not list(Path(alone["JOBS_ARTIFACT_DIR"]).glob(f"{job_id}*")), "nothing on disk"


def test_dlq_records_an_undeliverable_record_only_when_no_job_can_still_run_it(alone):
    """A record the trigger gave up on (an outage longer than its retries) is a dead letter
    only if no job of ours stands behind it: a waiting job is the sweeper's to publish again,
    a finished one needs nothing."""
    waiting = submit("ECHO", {"message": "still waiting"})
    finished = submit("ECHO", {"message": "done meanwhile"})
    deliver(finished, "ECHO")
    unknown = str(uuid.uuid4())
    dlq = client("dlq", "record_dead_letter", "cloudevent")
    for job_id in (waiting, finished, unknown):
        event = CloudEvent({"type": "dev.jobs.job.ready", "source": "/tests/dlq",
                            "id": f"{job_id}:undeliverable", "knativeerrorcode": "503"},
                           {"job_id": job_id, "job_type": "ECHO"})
        headers, body = to_binary(event)
        assert dlq.post("/", headers=headers, data=body).status_code == 200
    recorded = {r["job_id"] for r in query(alone["DATABASE_URL"],
                "SELECT job_id::text FROM dead_letters WHERE job_id = ANY(CAST(:ids AS uuid[]))",
                ids=[waiting, finished, unknown])}
    assert recorded == {unknown}
    assert job_row(alone["DATABASE_URL"], waiting)["status"] == "QUEUED"
