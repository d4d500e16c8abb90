"""Function tier: each function in-process via functions_framework.create_app(...).test_client(),
against the session's real PostgreSQL, Redis and Kafka; CloudEvents built by the SDK."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import uuid
from pathlib import Path

import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from functions_framework import create_app

from common.db import Database, rows_as_dicts
from tests.support.client import wait_for

pytestmark = pytest.mark.integration
FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"


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


def attempts_of(database_url: str, job_id: str) -> list[dict]:
    db = Database(database_url)
    try:
        with db.connection() as conn:
            return rows_as_dicts(conn, conn.run(
                "SELECT * FROM job_attempts WHERE job_id = CAST(:id AS uuid) ORDER BY attempt",
                id=job_id))
    finally:
        db.close()


def test_process_runs_the_handler_and_records_the_result(function_env):
    # The stack's own bridge may deliver this job too: either way it runs exactly once.
    job_id = submit("ECHO", {"message": "from a test client"})
    headers, body = job_event(job_id, "ECHO")
    assert client("process", "process_job", "cloudevent").post(
        "/", headers=headers, data=body).status_code == 200
    status_client = client("status", "get_job_status")
    # If the stack's own worker claimed it first, ours was ignored: wait for that one.
    status = wait_for(lambda: (doc := status_client.get(f"/jobs/{job_id}").json)["status"]
                      == "COMPLETED" and doc, 20, "the job to complete")
    assert status["result"]["echo"] == "from a test client"
    assert len(attempts_of(function_env["DATABASE_URL"], job_id)) == 1


def test_the_same_record_delivered_twice_at_once_runs_the_handler_once(function_env):
    job_id = submit("SLOW", {"seconds": 0.3})
    headers, body = job_event(job_id, "SLOW", ce_id=f"dup-{uuid.uuid4()}")
    process = create_app("process_job", str(FUNCTIONS / "process" / "main.py"), "cloudevent")

    def deliver(_):
        return process.test_client().post("/", headers=headers, data=body).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(deliver, range(4))) == [200] * 4
    rows = attempts_of(function_env["DATABASE_URL"], job_id)
    assert [r["attempt"] for r in rows] == [1]


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


def test_the_batch_target_answers_each_event_of_a_batch_in_order(function_env):
    good = submit("ECHO", {"message": "in a batch"})
    batch = [
        {"specversion": "1.0", "id": "a", "type": "t", "source": "/tests",
         "datacontenttype": "application/json", "data": {"job_id": good, "job_type": "ECHO"}},
        {"specversion": "1.0", "id": "b", "type": "t", "source": "/tests",
         "datacontenttype": "application/json", "data": {"no": "job"}},
        {"specversion": "1.0", "id": "c", "type": "t", "source": "/tests",
         "data_base64": "bm90IGpzb24="},
        {"specversion": "1.0", "id": "d", "source": "/tests", "data": {}},  # no type
        "not an event",
    ]
    reply = client("process", "process_job_batch").post(
        "/", json=batch, headers={"Content-Type": "application/cloudevents-batch+json"})
    assert reply.status_code == 200
    assert [(r["id"], r["status"]) for r in reply.json["results"]] == [
        ("a", 200), ("b", 400), ("c", 400), ("d", 400), (None, 400)]
    assert "not a CloudEvent" in reply.json["results"][3]["detail"]
    status_client = client("status", "get_job_status")
    wait_for(lambda: status_client.get(f"/jobs/{good}").json["status"] == "COMPLETED", 20,
             "the batched job to complete (here or in the stack's own worker)")


def test_the_batch_target_also_takes_one_binary_mode_event(function_env):
    job_id = submit("ECHO", {"message": "single"})
    headers, body = job_event(job_id, "ECHO")
    batch_client = client("process", "process_job_batch")
    assert batch_client.post("/", headers=headers, data=body).status_code == 200
    bad_headers, bad_body = job_event(str(uuid.uuid4()), "ECHO")
    assert batch_client.post("/", headers=bad_headers, data=bad_body).status_code == 400
