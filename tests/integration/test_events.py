"""`GET /jobs/{id}/events` on the real stack, through the gateway: a job's documents as
server-sent events until it ends; the errors before a stream starts; the limit on open
streams, and streams that end when their client goes."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sseclient
import urllib3

from common.cache import CHANGES_PREFIX
from common.db import Database
from tests.support.client import Api, in_thread, wait_for

pytestmark = pytest.mark.integration

END = ("COMPLETED", "CANCELLED", "DEAD_LETTER")


def open_stream(api: Api, job_id: str, **headers: str) -> urllib3.BaseHTTPResponse:
    hdrs = {"Accept": "text/event-stream", **headers}
    if api.token is not None:
        hdrs["Authorization"] = f"Bearer {api.token}"
    return api.http.request("GET", f"{api.base}/jobs/{job_id}/events", headers=hdrs,
                            preload_content=False, retries=False,
                            timeout=urllib3.Timeout(connect=5, read=30))


def documents(response: urllib3.BaseHTTPResponse) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event id, job document) of each event, until the server ends the stream."""
    for event in sseclient.SSEClient(response).events():
        yield event.id, json.loads(event.data)


def all_documents(api: Api, job_id: str, timeout: float = 30, **headers: str
                  ) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the job's stream; fails if the stream has not ended by `timeout`."""
    response = open_stream(api, job_id, **headers)
    assert response.status == 200, response.data
    assert response.headers["content-type"].startswith("text/event-stream")
    return in_thread(lambda: list(documents(response))).result(timeout=timeout)


def test_the_stream_of_a_job_ends_with_its_final_document_after_its_progress(api):
    job_id = api.submit("PROGRESS", {"steps": 4, "step_seconds": 0.3}).json["job_id"]
    events = all_documents(api, job_id)
    docs = [doc for _, doc in events]
    versions = [doc["version"] for doc in docs]
    assert versions == sorted(set(versions)), f"versions must increase: {versions}"
    assert [event_id for event_id, _ in events] == [str(v) for v in versions]
    assert docs[-1]["status"] == "COMPLETED" and docs[-1]["result"] == {"steps": 4}
    assert all(doc["status"] not in END for doc in docs[:-1])
    assert docs[-1] == api.job(job_id), "the last event is the job's final document"
    progress = [doc["progress_message"] for doc in docs if doc["status"] == "IN_PROGRESS"]
    assert {"step 2 of 4", "step 3 of 4"} <= set(progress), progress


def test_a_job_that_already_ended_gives_one_event_and_the_stream_ends(api):
    done = api.wait_status(api.submit("ECHO", {"message": "over"}).json["job_id"])
    dead = api.wait_status(api.submit("PERMANENT_FAIL").json["job_id"], "DEAD_LETTER")
    for job in (done, dead):
        assert [doc for _, doc in all_documents(api, job["job_id"])] == [job]


def test_a_client_that_has_the_last_document_is_told_there_is_nothing_more(api):
    job = api.wait_status(api.submit("ECHO", {"message": "resume"}).json["job_id"])
    reply = api.request("GET", f"/jobs/{job['job_id']}/events",
                        headers={"Last-Event-ID": str(job["version"])})
    assert reply.status == 204 and reply.body == b""
    older = all_documents(api, job["job_id"], **{"Last-Event-ID": str(job["version"] - 1)})
    assert [doc for _, doc in older] == [job]


def open_streams(api: Api) -> float:
    """jobs_event_streams_open, added up over the gateway's processes."""
    text = api.request("GET", "/metrics").body.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("jobs_event_streams_open"))


def test_a_cancelled_job_ends_its_stream_and_idle_streams_get_heartbeats(api):
    job_id = api.submit("SLEEPY", {"seconds": 20}).json["job_id"]
    before = open_streams(api)
    response = open_stream(api, job_id)
    wait_for(lambda: open_streams(api) >= before + 1, 10, "the stream in the metrics")
    lines: list[bytes] = []

    def read() -> None:
        for line in response:  # raw lines: heartbeats are comments, which parsers drop
            lines.append(line)

    reader = in_thread(read)
    wait_for(lambda: any(line.startswith(b":") for line in lines), 10,
             "a heartbeat comment (JOBS_EVENTS_HEARTBEAT_SECONDS=1 in tests/conftest.py)")
    wait_for(lambda: api.job(job_id)["status"] == "IN_PROGRESS", 15, "the job to run")
    assert api.request("POST", f"/jobs/{job_id}/cancel").status == 202
    reader.result(timeout=30)  # the stream ended
    data = [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]
    assert data[-1]["status"] == "CANCELLED" and data[-1] == api.job(job_id)
    wait_for(lambda: open_streams(api) <= before, 10, "the stream's end in the metrics")


def test_a_stream_outlives_the_gateways_read_timeout(api):
    """JOBS_GATEWAY_READ_TIMEOUT_SECONDS (3 s in tests/conftest.py) bounds reading a
    request, never answering one: a job of 5 s is followed to its end."""
    job_id = api.submit("SLEEPY", {"seconds": 5}).json["job_id"]
    started = time.monotonic()
    docs = [doc for _, doc in all_documents(api, job_id, timeout=60)]
    assert time.monotonic() - started > 4
    assert docs[-1]["status"] == "COMPLETED" and docs[-1] == api.job(job_id)


def test_a_change_that_was_never_announced_still_reaches_the_stream(api, database_url):
    """The backstop: the stream re-reads its job (here a write straight to PostgreSQL,
    which no cache write announces)."""
    job_id = api.submit("SLEEPY", {"seconds": 20}).json["job_id"]
    response = open_stream(api, job_id)
    seen: list[dict[str, Any]] = []
    reader = in_thread(lambda: seen.extend(doc for _, doc in documents(response)))
    wait_for(lambda: any(doc["status"] == "IN_PROGRESS" for doc in seen), 15, "IN_PROGRESS")
    db = Database(database_url)
    try:
        db.run("UPDATE jobs SET progress_message = 'written behind the cache',"
               " version = version + 1 WHERE job_id = CAST(:id AS uuid)", id=job_id)
    finally:
        db.close()
    wait_for(lambda: any(doc["progress_message"] == "written behind the cache"
                         for doc in seen), 10, "the unannounced change")
    assert api.request("POST", f"/jobs/{job_id}/cancel").status == 202
    reader.result(timeout=30)
    assert seen[-1]["status"] == "CANCELLED"


def test_errors_come_as_problems_before_any_stream_starts(api, stack):
    missing = uuid.uuid4()
    unknown = api.request("GET", f"/jobs/{missing}/events")
    assert unknown.status == 404 and unknown.content_type == "application/problem+json"
    assert "no job" in unknown.json["detail"]
    assert unknown.json["instance"] == f"/jobs/{missing}/events"  # the URL asked for
    bad = api.request("GET", "/jobs/not-a-uuid/events")
    assert bad.status == 400 and bad.content_type == "application/problem+json"
    assert bad.json["instance"] == "/jobs/not-a-uuid/events"
    job_id = api.submit("ECHO", {"message": "x"}).json["job_id"]
    anonymous = Api(stack.gateway_url).request("GET", f"/jobs/{job_id}/events")
    assert anonymous.status == 401 and anonymous.content_type == "application/problem+json"
    token = api.request("POST", "/tokens", json_body={"name": "events-submitter",
                                                      "scopes": ["jobs:submit"]}).json["token"]
    refused = Api(stack.gateway_url, token).request("GET", f"/jobs/{job_id}/events")
    assert refused.status == 403 and "jobs:read" in refused.json["detail"]


def test_the_event_stream_is_in_the_openapi_document(api):
    op = api.request("GET", "/openapi.json").json["paths"]["/jobs/{job_id}/events"]["get"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert {"400", "401", "404", "503"} <= set(op["responses"])


# -- a gateway of this test's own, to look inside: its limit and its open streams ------


@pytest.fixture
def own_gateway(stack, function_env, monkeypatch) -> Iterator[tuple[Any, Api]]:
    """The gateway app in this process (uvicorn in a thread), at most 2 streams open."""
    import uvicorn

    from infra import services
    from infra.gateway import create_gateway

    monkeypatch.setenv("JOBS_EVENTS_MAX_STREAMS", "2")
    monkeypatch.setenv("JOBS_EVENTS_HEARTBEAT_SECONDS", "1")
    app = create_gateway({"submit": stack.function_url("submit"),
                          "status": stack.function_url("status")})
    port = services.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15, "the gateway to start")
    try:
        yield app.state.gateway, Api(f"http://127.0.0.1:{port}", stack.admin_token)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_streams_over_the_limit_get_a_503_and_a_client_that_leaves_frees_its_stream(
        own_gateway, stack):
    gateway, api = own_gateway
    job_id = api.submit("SLEEPY", {"seconds": 30}).json["job_id"]
    with contextlib.ExitStack() as opened:
        first = opened.enter_context(contextlib.closing(open_stream(api, job_id)))
        second = opened.enter_context(contextlib.closing(open_stream(api, job_id)))
        assert first.status == second.status == 200
        wait_for(lambda: gateway.events.open == 2, 10, "two open streams")
        assert gateway.events.announcements.watched() == 1  # one subscription for the job
        over = api.request("GET", f"/jobs/{job_id}/events")
        assert over.status == 503 and over.headers["retry-after"]
        assert "JOBS_EVENTS_MAX_STREAMS" in over.json["detail"]
        first.shutdown()  # the client goes away: its stream's task must end
        first.close()
        wait_for(lambda: gateway.events.open == 1, 10, "the abandoned stream to end")
        third = opened.enter_context(contextlib.closing(open_stream(api, job_id)))
        assert third.status == 200
    wait_for(lambda: gateway.events.open == 0, 10, "every stream to end")
    wait_for(lambda: gateway.events.announcements.watched() == 0, 5, "no watcher left")
    channel = CHANGES_PREFIX + job_id
    raw = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        wait_for(lambda: dict(raw.pubsub_numsub(channel))[channel.encode()] == 0, 5,
                 "no subscription left in Redis")
    finally:
        raw.close()
    assert api.request("POST", f"/jobs/{job_id}/cancel").status == 202


# -- with dependencies: WAITING is no end; a cancel by a parent's failure is -----------


def test_a_waiting_childs_stream_follows_it_through_its_parent_to_its_end(api):
    parent = api.submit("SLEEPY", {"seconds": 2}).json["job_id"]
    child = api.submit("ECHO", {"message": "after"}, depends_on=[parent]).json
    assert child["status"] == "WAITING"
    docs = [doc for _, doc in all_documents(api, child["job_id"], timeout=60)]
    assert docs[0]["status"] == "WAITING" and docs[-1]["status"] == "COMPLETED"
    assert api.job(parent)["status"] == "COMPLETED"


def test_a_child_cancelled_by_its_parents_end_ends_its_stream(api):
    parent = api.submit("SLEEPY", {"seconds": 30}).json["job_id"]
    child = api.submit("ECHO", {"message": "never"}, depends_on=[parent]).json["job_id"]
    response = open_stream(api, child)
    seen: list[dict[str, Any]] = []
    reader = in_thread(lambda: seen.extend(doc for _, doc in documents(response)))
    wait_for(lambda: seen, 10, "the child's first event")
    assert api.request("POST", f"/jobs/{parent}/cancel").status == 202
    reader.result(timeout=30)
    assert seen[-1]["status"] == "CANCELLED" and seen[-1]["cancelled_by"] == parent
    assert seen[-1] == api.job(child)
