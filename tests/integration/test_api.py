"""The public API through the gateway, on the real stack."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import urllib.parse
import uuid

import pytest
import redis

from common.cache import StatusCache
from common.db import Database
from tests.support.client import Api, wait_for

pytestmark = pytest.mark.integration


def test_a_submitted_job_answers_202_with_its_location_and_completes(api):
    reply = api.submit("ECHO", {"message": "hello"})
    assert reply.status == 202
    job = reply.json
    assert reply.headers["location"] == f"/jobs/{job['job_id']}"
    assert job["status"] == "QUEUED" and job["retries"] == 0
    done = api.wait_status(job["job_id"])
    assert done["status"] == "COMPLETED" and done["result"]["echo"] == "hello"


@pytest.mark.parametrize("body,content_type,status", [
    (b'{"job_type": ', "application/json", 400),
    (b'"just a string"', "application/json", 422),
    (b'{"job_type": "NO_SUCH_TYPE", "payload": {}}', "application/json", 422),
    (b'{"job_type": "ECHO", "payload": {"message": ["not", "a", "string"]}}',
     "application/json", 422),
    (b'{"job_type": "ECHO", "payload": {}, "max_retries": -3}', "application/json", 422),
    (b'{"job_type": "ECHO", "payload": {"message": "x"}}', "text/plain", 415),
])
def test_bad_submissions_get_a_problem_document_never_a_500(api, body, content_type, status):
    reply = api.request("POST", "/jobs", body=body, headers={"Content-Type": content_type})
    assert reply.status == status
    assert reply.content_type == "application/problem+json"
    problem = reply.json
    assert problem["status"] == status and problem["title"] and problem["detail"]


def test_a_body_over_256_kib_is_refused_with_413(api):
    big = {"job_type": "ECHO", "payload": {"message": "x" * (300 * 1024)}}
    reply = api.request("POST", "/jobs", json_body=big)
    assert reply.status == 413 and reply.content_type == "application/problem+json"


def test_status_answers_400_for_a_non_uuid_and_404_for_an_unknown_job(api):
    assert api.request("GET", "/jobs/not-a-uuid").status == 400
    reply = api.request("GET", f"/jobs/{uuid.uuid4()}")
    assert reply.status == 404 and reply.content_type == "application/problem+json"


def test_an_unknown_route_is_404_and_a_wrong_method_is_405(api):
    assert api.request("GET", "/nothing-here").status == 404
    reply = api.request("DELETE", "/jobs")
    assert reply.status == 405 and "POST" in reply.headers["allow"]


def test_the_same_idempotency_key_and_body_give_the_same_job(api):
    key = f"key-{uuid.uuid4()}"
    first = api.request(
        "POST", "/jobs", json_body={"job_type": "ECHO", "payload": {"message": "once"}},
        headers={"Idempotency-Key": key})
    second = api.request("POST", "/jobs",
                         json_body={"payload": {"message": "once"}, "job_type": "ECHO"},
                         headers={"Idempotency-Key": key})
    assert first.status == second.status == 202
    assert first.json["job_id"] == second.json["job_id"]
    other = api.request("POST", "/jobs",
                        json_body={"job_type": "ECHO", "payload": {"message": "twice"}},
                        headers={"Idempotency-Key": key})
    assert other.status == 409 and other.content_type == "application/problem+json"


def test_an_idempotency_key_sent_twice_is_a_400_not_a_third_key(api):
    """A server joins repeated headers with commas: k1 and k2 would become "k1,k2"."""
    parsed = urllib.parse.urlsplit(api.base)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.putrequest("POST", "/jobs")
        for name, value in [("Authorization", f"Bearer {api.token}"),
                            ("Content-Type", "application/json"),
                            ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]:
            conn.putheader(name, value)
        body = json.dumps({"job_type": "ECHO", "payload": {"message": "twice"}}).encode()
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        reply = conn.getresponse()
        answer = json.loads(reply.read())
    finally:
        conn.close()
    assert reply.status == 400, answer
    assert answer["title"] == "Bad Idempotency-Key" and "more than once" in answer["detail"]
    joined = api.request("GET", "/jobs?limit=5").json["items"]
    assert all(job["payload"] != {"message": "twice"} for job in joined)


def test_twenty_concurrent_identical_requests_with_one_key_make_one_job(api, database_url):
    key = f"burst-{uuid.uuid4()}"
    body = {"job_type": "ECHO", "payload": {"message": "burst"}}

    def send(_):
        return api.request("POST", "/jobs", json_body=body, headers={"Idempotency-Key": key})

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(send, range(20)))
    assert {r.status for r in replies} == {202}
    assert len({r.json["job_id"] for r in replies}) == 1
    from common.db import Database

    db = Database(database_url)
    try:
        assert db.run("SELECT count(*) FROM jobs WHERE idempotency_key = :k", k=key) == [[1]]
    finally:
        db.close()


def test_list_filters_by_status_and_type_and_pages_with_a_cursor(api):
    ids = {api.submit("NOOP", {"n": i}).json["job_id"] for i in range(5)}
    for job_id in ids:
        api.wait_status(job_id)
    seen, cursor = [], None
    while True:
        path = "/jobs?job_type=NOOP&status=COMPLETED&limit=2" + (f"&cursor={cursor}"
                                                                  if cursor else "")
        page = api.request("GET", path).json
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert ids <= {j["job_id"] for j in seen}
    assert {j["job_type"] for j in seen} == {"NOOP"} and {j["status"] for j in seen} == {
        "COMPLETED"}
    assert len(seen) == len({j["job_id"] for j in seen})
    assert api.request("GET", "/jobs?status=BOGUS").status == 400
    assert api.request("GET", "/jobs?cursor=garbage").status == 400


def test_list_finds_jobs_by_a_prefix_of_their_id_whatever_their_age(api):
    job_id = api.submit("NOOP", {}).json["job_id"]
    for prefix in (job_id[:4], job_id[:9], job_id[:13].upper(), job_id):
        page = api.request("GET", f"/jobs?id_prefix={prefix}&limit=200").json
        assert job_id in {j["job_id"] for j in page["items"]}, prefix
        assert all(j["job_id"].startswith(prefix.lower()) for j in page["items"]), prefix
    status = api.wait_status(job_id)["status"]
    both = api.request("GET", f"/jobs?id_prefix={job_id[:8]}&status={status}").json
    assert job_id in {j["job_id"] for j in both["items"]}
    other = "RETRYING" if status != "RETRYING" else "QUEUED"
    assert api.request("GET", f"/jobs?id_prefix={job_id}&status={other}").json["items"] == []
    for bad in ("xyz", "3f1c-9a", "-", "3f1c9a2e 5b"):
        refused = api.request("GET", f"/jobs?id_prefix={bad}")
        assert refused.status == 400 and "not the start of a job id" in refused.json["detail"]
    assert api.request("GET", f"/jobs?id_prefix={job_id}0").status == 400


def test_an_older_cache_write_never_overwrites_a_newer_one(stack):
    cache = StatusCache(stack.env["REDIS_URL"])
    job_id = str(uuid.uuid4())
    doc = {"job_id": job_id, "status": "COMPLETED", "version": 5}
    assert cache.put([doc])
    cache.put([{**doc, "status": "IN_PROGRESS", "version": 4}])
    cache.put([{**doc, "status": "QUEUED", "version": 5}])
    assert cache.get(job_id)["status"] == "COMPLETED"
    cache.put([{**doc, "status": "DEAD_LETTER", "version": 6}])
    assert cache.get(job_id)["status"] == "DEAD_LETTER"


def test_status_is_served_from_the_cache_and_filled_on_a_miss(api, stack):
    job_id = api.wait_status(api.submit("ECHO", {"message": "cached"}).json["job_id"])["job_id"]
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    key = f"jobs:status:{job_id}"
    assert json.loads(client.hget(key, "doc"))["status"] == "COMPLETED"
    client.delete(key)
    # The status function itself (the gateway may answer from its memory of final jobs).
    status_function = Api(stack.function_url("status"), stack.admin_token)
    assert status_function.job(job_id)["status"] == "COMPLETED"
    assert client.hget(key, "doc") is not None


def test_only_final_documents_are_served_from_memory_or_the_cache(api, stack):
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    done = api.wait_status(api.submit("ECHO", {"message": "final"}).json["job_id"])
    assert done["status"] == "COMPLETED"
    assert api.job(done["job_id"]) == done  # looked up once more: now in memory too
    client.delete(f"jobs:status:{done['job_id']}")
    assert api.job(done["job_id"]) == done  # a final document never changes
    # A job in any other state is read from PostgreSQL every time: a change shows at once,
    # and an older document left in Redis (a failed cache write) is never served.
    waiting = api.submit("ECHO", {"message": "later"}, run_at="2099-01-01T00:00:00Z").json
    assert api.job(waiting["job_id"])["status"] == "QUEUED"
    key = f"jobs:status:{waiting['job_id']}"
    assert client.hget(key, "doc") is None  # only final documents are cached
    # What a failed cache write leaves behind: an older version than PostgreSQL's.
    client.hset(key, mapping={"v": 1, "doc": json.dumps(waiting)})
    db = Database(stack.env["DATABASE_URL"])
    try:
        db.run("UPDATE jobs SET progress_message = 'seen', version = version + 1"
               " WHERE job_id = CAST(:id AS uuid)", id=waiting["job_id"])
    finally:
        db.close()
    seen = api.job(waiting["job_id"])
    assert (seen["status"], seen["progress_message"], seen["version"]) == ("QUEUED", "seen",
                                                                            2)
    api.request("POST", f"/jobs/{waiting['job_id']}/cancel")


def test_status_and_submit_keep_working_with_redis_stopped(api, stack):
    done = api.wait_status(api.submit("ECHO", {"message": "before"}).json["job_id"])
    stack.stop_service("redis")
    try:
        assert api.job(done["job_id"])["status"] == "COMPLETED"
        reply = api.submit("ECHO", {"message": "during the outage"})
        assert reply.status == 202
        assert api.wait_status(reply.json["job_id"])["status"] == "COMPLETED"
    finally:
        stack.restart_service("redis")
    assert api.job(done["job_id"])["status"] == "COMPLETED"


def test_status_keeps_working_with_redis_hung(api, stack):
    done = api.wait_status(api.submit("ECHO", {"message": "hang"}).json["job_id"])
    redis_server = stack.services["redis"]
    redis_server.pause()
    try:
        assert api.job(done["job_id"])["status"] == "COMPLETED"
    finally:
        redis_server.resume()


def test_swagger_ui_and_its_assets_are_served_locally(api):
    page = api.request("GET", "/swagger-ui.html")
    assert page.status == 200 and b"/openapi.json" in page.body and b"http" not in page.body
    assert api.request("GET", "/swagger-ui/swagger-ui-bundle.js").status == 200
    doc = api.request("GET", "/openapi.json").json
    assert doc["openapi"].startswith("3.1") and "/jobs" in doc["paths"]


def test_health_and_readiness_report_each_dependency(api):
    assert api.request("GET", "/healthz").json == {"status": "ok"}
    ready = api.request("GET", "/readyz").json
    assert ready["ready"] is True
    assert {"postgresql", "redis", "kafka", "trigger:job-queue"} <= set(ready["checks"])
    assert all(check["ok"] for check in ready["checks"].values())


def test_a_final_document_is_announced_to_the_gateway_before_anyone_asks(api, stack):
    job_id = api.submit("ECHO", {"message": "announced"}).json["job_id"]
    # the status function, not the gateway: it must not learn of the job by asking
    status_function = Api(stack.function_url("status"), stack.admin_token)
    wait_for(lambda: status_function.job(job_id)["status"] == "COMPLETED", timeout=30)
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    key = f"jobs:status:{job_id}"

    def answered_from_memory() -> bool:
        client.delete(key)  # a lookup that reached Redis or PostgreSQL would refill it
        return api.job(job_id)["status"] == "COMPLETED" and client.hget(key, "doc") is None

    wait_for(answered_from_memory, timeout=10)


@pytest.mark.parametrize("run_at", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
def test_an_extreme_run_at_is_a_422_and_stores_nothing(api, database_url, run_at):
    marker = str(uuid.uuid4())
    reply = api.submit("ECHO", {"message": marker}, run_at=run_at)
    assert reply.status == 422 and reply.json["errors"][0]["loc"] == ["run_at"], reply.body
    db = Database(database_url)
    try:
        assert db.run("SELECT count(*) FROM jobs WHERE payload_json->>'message' = :m",
                      m=marker) == [[0]]
    finally:
        db.close()
    assert api.request("GET", "/jobs?status=QUEUED&limit=200").status == 200


def test_a_batch_with_bad_items_names_each_of_them_and_makes_nothing(api):
    marker = f"bad-batch-{uuid.uuid4()}"
    reply = api.request("POST", "/jobs/batch", json_body={"jobs": [
        {"job_type": "ECHO", "payload": {"message": marker}},
        {"job_type": "ECHO", "payload": {"message": {"not": "a string"}}},
        {"job_type": "NOPE", "payload": {}}]})
    assert reply.status == 422, reply.body
    assert reply.json["detail"].startswith("2 of 3 items are invalid: item 1: payload does not"
                                           " match the ECHO payload model"), reply.json
    assert "item 2: job_type 'NOPE' is not registered" in reply.json["detail"]
    assert [e["loc"] for e in reply.json["errors"]] == [["jobs", 1, "payload", "message"],
                                                        ["jobs", 2, "job_type"]]
    recent = api.request("GET", "/jobs?limit=20").json["items"]
    assert all(job["payload"].get("message") != marker for job in recent)


def test_a_single_key_can_never_name_an_item_of_a_batch(api):
    key = f"k-{uuid.uuid4()}"
    single = api.request("POST", "/jobs", json_body={"job_type": "ECHO",
                                                     "payload": {"message": "single"}},
                         headers={"Idempotency-Key": f"batch:{key}:0"})
    assert single.status == 202, single.body
    batch = api.request("POST", "/jobs/batch", headers={"Idempotency-Key": key},
                        json_body={"jobs": [{"job_type": "ECHO",
                                             "payload": {"message": "batch"}}]})
    assert batch.status == 202, batch.body
    assert batch.json["jobs"][0]["job_id"] != single.json["job_id"]


def test_a_batch_refused_for_a_reused_key_leaves_no_job_behind(api, database_url):
    key = f"k-{uuid.uuid4()}"
    first = api.request("POST", "/jobs/batch", headers={"Idempotency-Key": key},
                        json_body={"jobs": [{"job_type": "ECHO", "payload": {"message": "a"}}]})
    assert first.status == 202, first.body
    # Another batch under the key: item 0's key exists (409), items 1-4 have new keys.
    other = api.request("POST", "/jobs/batch", headers={"Idempotency-Key": key},
                        json_body={"jobs": [{"job_type": "ECHO", "payload": {"message": m}}
                                            for m in "bcdef"]})
    assert other.status == 409, other.body
    assert f"Idempotency-Key {key!r} (a batch's key) was already used" in other.json["detail"]
    assert "\t" not in other.json["detail"]  # the internal per-item form is not shown
    db = Database(database_url)
    try:
        [[count]] = db.run("SELECT count(*) FROM jobs WHERE idempotency_key LIKE :k",
                           k=f"batch\t{key}\t%")
    finally:
        db.close()
    assert count == 1  # the first batch's job only: the refused one is one transaction
    again = api.request("POST", "/jobs/batch", headers={"Idempotency-Key": key},
                        json_body={"jobs": [{"job_type": "ECHO", "payload": {"message": "a"}}]})
    assert again.status == 202 and again.json["jobs"][0]["job_id"] == first.json["jobs"][0][
        "job_id"]


@pytest.mark.parametrize("byte_range", ["bytes=99999999-", "bytes=5-2", "bytes=abc"])
def test_a_range_the_artifact_cannot_satisfy_is_a_problem_never_a_500(api, byte_range):
    job = api.wait_status(api.submit("REPORT_GENERATION", {
        "title": "r", "columns": ["a"], "rows": [[1]], "format": "csv"}).json["job_id"])
    reply = api.request("GET", f"/jobs/{job['job_id']}/artifact",
                        headers={"Range": byte_range})
    assert reply.status in (200, 206, 416), reply.body[:300]
    if reply.status == 416:
        assert reply.content_type == "application/problem+json"
