"""Hostile input: schemathesis generates requests (valid and invalid) from /openapi.json.

Every operation of the running gateway is driven with examples derived from the
published OpenAPI document. Whatever the input, the API must never answer 5xx, and every
answer must be one the document promises: a documented status code, the documented
content type, and a body matching the documented schema.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.client import Api

pytestmark = pytest.mark.integration

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="session")
def api_schema(api: Api) -> schemathesis.BaseSchema:
    """The schema as the running gateway publishes it, with the gateway as base URL."""
    loaded = schemathesis.openapi.from_url(f"{api.base}/openapi.json")
    # As a user with an admin token: every operation is reached, not just its 401.
    loaded.config.update(base_url=api.base, request_timeout=30,
                         headers={"Authorization": f"Bearer {api.token}"})
    return loaded


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """Give the test item the `_nodeid` attribute schemathesis 4.32 reads.

    pytest 9.2 keeps node ids as `NodeId` objects in `_id` and dropped `_nodeid`
    (pytest-dev/pytest#14758); schemathesis' lazy loader still reads and rewrites
    `request.node._nodeid` (only to label each operation's subtest).
    """
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_the_api_answers_any_generated_request_as_its_schema_documents(case, api: Api):
    if sent_for_another_job_type(case):
        return
    response = case.call_and_validate(checks=CHECKS)
    undo_what_it_made(api, case, response)


# Fields every job type's submission schema shares (common.openapi: one schema per type).
SHARED_FIELDS = re.compile(r"\b(max_retries|run_at|depends_on|callback_url)\b")
_shared_scenarios_sent: set[str] = set()


def sent_for_another_job_type(case: Any) -> bool:
    """Whether this coverage-phase case repeats, for another job type, a scenario of a
    field every type shares that was already sent. The submission body is a oneOf of one
    schema per job type, and the coverage phase walks the shared fields' scenarios once
    per alternative (18 on the test stack), in bodies that differ only in `job_type` and
    its payload. Each type's own scenarios are all sent, and every scenario at least once:
    the shared fields are checked by JobSubmission, the same model for every type."""
    if case.meta is None or case.meta.phase.name != "coverage":
        return False
    description = getattr(case.meta.phase.data, "description", "") or ""
    if not SHARED_FIELDS.search(description) or re.search(r"payload|job_type", description):
        return False

    def without_type(item: Any) -> Any:
        if isinstance(item, dict) and "job_type" in item:
            return {k: v for k, v in item.items() if k not in ("job_type", "payload")}
        return item

    body = case.body
    if isinstance(body, dict) and isinstance(body.get("jobs"), list):
        body = {**body, "jobs": [without_type(item) for item in body["jobs"]]}
    key = json.dumps([case.operation.label, description, without_type(body),
                      dict(case.headers or {}), case.query], sort_keys=True, default=repr)
    if key in _shared_scenarios_sent:
        return True
    _shared_scenarios_sent.add(key)
    return False


def undo_what_it_made(api: Api, case: Any, response: Any) -> None:
    """Cancel the jobs a generated request made and delete its schedule, at once. Left to
    run they would load the stack for the rest of the session: the coverage phase submits
    the documented example (a PDF report) in batches of 999 and 1,000, minutes of CPU."""
    operation, status = case.operation.label, response.status_code
    made: list[str] = []
    if operation == "POST /jobs" and status == 202:
        made = [response.json()["job_id"]]
    elif operation == "POST /jobs/batch" and status == 202:
        made = [job["job_id"] for job in response.json()["jobs"]]
    elif operation == "POST /schedules" and status == 201:
        name = quote(response.json()["name"], safe="")
        deleted = api.request("DELETE", f"/schedules/{name}")
        assert deleted.status == 204, deleted.body[:300]
    if not made:
        return

    def cancel(job_id: str) -> None:
        reply = api.request("POST", f"/jobs/{job_id}/cancel")
        assert reply.status in (202, 409), reply.body[:300]  # 409: it had ended already

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(cancel, made))


# Regressions for what the run above found: valid JSON that PostgreSQL cannot store
# reached the INSERT and came back as a 500.
UNSTORABLE_BODIES = {
    "NUL in a string": b'{"job_type": "NOOP", "payload": {"text": "a\\u0000b"}}',
    "NUL in a key": b'{"job_type": "NOOP", "payload": {"a\\u0000": 1}}',
    "unpaired surrogate": b'{"job_type": "NOOP", "payload": {"text": "\\ud800"}}',
    "number beyond float": b'{"job_type": "NOOP", "payload": {"n": 1e400}}',
    "nesting too deep": b'{"job_type": "NOOP", "payload": {"a": ' + b"[" * 100 + b"]" * 100
                        + b"}}",
    # deeper than Python's recursion limit: json.loads itself gives up
    "nesting far too deep": b'{"job_type": "NOOP", "payload": {"a": ' + b"[" * 5000
                            + b"]" * 5000 + b"}}",
}


@pytest.mark.parametrize("body", UNSTORABLE_BODIES.values(), ids=UNSTORABLE_BODIES.keys())
@pytest.mark.parametrize("path", ["/jobs", "/jobs/batch"])
def test_json_postgresql_cannot_store_is_a_422_saying_why(api: Api, path: str,
                                                                 body: bytes):
    if path == "/jobs/batch":
        body = b'{"jobs": [' + body + b"]}"
    reply = api.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    assert reply.status == 422, reply.body[:300]
    assert reply.content_type == "application/problem+json"
    assert reply.json["errors"], reply.json


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_number_literals_are_malformed_json(api: Api, literal: bytes):
    body = b'{"job_type": "NOOP", "payload": {"n": ' + literal + b"}}"
    reply = api.request("POST", "/jobs", body=body, headers={"Content-Type": "application/json"})
    assert reply.status == 400, reply.body[:300]
    assert reply.content_type == "application/problem+json"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/jobs?job_type=%00", 400),
    ("GET", "/jobs?cursor=%00", 400),
    ("GET", "/jobs/ab%0Acd", 400),  # a newline in the id: no Flask rule takes the path
    ("GET", "/jobs/ab%0Acd/artifact", 400),
    ("GET", "/jobs/ab%0Acd/events", 400),
    ("POST", "/jobs/ab%0Acd/retry", 400),
    ("POST", "/jobs/%0A", 405),
    ("GET", "/%0A", 404),
])
def test_hostile_paths_and_queries_get_problem_documents(api: Api, method: str, path: str,
                                                         status: int):
    reply = api.request(method, path)
    assert reply.status == status, reply.body[:300]
    assert reply.content_type == "application/problem+json", reply.body[:300]
