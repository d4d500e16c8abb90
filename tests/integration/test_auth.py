"""Nobody in who does not belong: bearer tokens and scopes, through the real gateway and
the functions behind it, as a user holding each kind of token would see them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from common.routes import API
from tests.support.client import Api, wait_for

pytestmark = pytest.mark.integration

REPORT = {"title": "t", "columns": ["a"], "rows": [[1]]}


def make_token(api: Api, name: str, *scopes: str, **extra) -> tuple[str, str]:
    reply = api.request("POST", "/tokens", json_body={"name": name, "scopes": list(scopes),
                                                      **extra})
    assert reply.status == 201, reply.body
    body = reply.json
    assert set(body) >= {"id", "name", "scopes", "token"} and body["scopes"] == list(scopes)
    return body["id"], body["token"]


def concrete(path: str) -> str:
    return re.sub(r"\{\w+\}", str(uuid.uuid4()), path)


@pytest.mark.parametrize("op", [op for op in API if not op.public], ids=lambda op: op.operation_id)
def test_every_operation_but_the_public_ones_refuses_a_request_without_a_token(stack, op):
    reply = Api(stack.gateway_url).request(op.method, concrete(op.path))
    assert reply.status == 401, reply.body
    assert reply.content_type == "application/problem+json"
    assert reply.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json", "/swagger-ui.html", "/",
                                  "/static/dashboard.js"])
def test_health_the_document_swagger_and_the_dashboard_need_no_token(stack, path):
    assert Api(stack.gateway_url).request("GET", path).status == 200


def test_an_unknown_or_malformed_token_is_refused(stack):
    for token in ["nonsense", "jobs_" + "0" * 32 + "_" + "A" * 43]:
        reply = Api(stack.gateway_url, token).request("GET", "/jobs")
        assert reply.status == 401, reply.body
        assert 'error="invalid_token"' in reply.headers["www-authenticate"]


def test_a_read_only_token_reads_but_may_not_submit_cancel_or_manage_tokens(api, stack):
    job = api.wait_status(api.submit("ECHO", {"message": "read me"}).json["job_id"])
    _, token = make_token(api, "reader", "jobs:read")
    reader = Api(stack.gateway_url, token)
    assert reader.job(job["job_id"])["status"] == "COMPLETED"
    assert reader.request("GET", "/jobs?limit=1").status == 200
    assert reader.request("GET", "/whoami").json == {"name": "reader", "scopes": ["jobs:read"]}
    for method, path, scope in [("POST", "/jobs", "jobs:submit"),
                                ("POST", f"/jobs/{job['job_id']}/cancel", "jobs:operate"),
                                ("GET", "/tokens", "admin")]:
        reply = reader.request(method, path, json_body={"job_type": "ECHO", "payload": {}})
        assert reply.status == 403, (path, reply.body)
        assert reply.content_type == "application/problem+json"
        assert scope in reply.json["detail"]


def test_a_job_records_the_name_of_the_token_that_submitted_it(api, stack):
    _, token = make_token(api, "billing-service", "jobs:submit", "jobs:read")
    doc = Api(stack.gateway_url, token).submit("ECHO", {"message": "who"}).json
    assert doc["submitted_by"] == "billing-service"
    assert api.job(doc["job_id"])["submitted_by"] == "billing-service"


def test_exporting_the_jobs_table_and_downloading_the_export_need_an_admin_token(api, stack):
    _, token = make_token(api, "submitter", "jobs:submit", "jobs:read")
    holder = Api(stack.gateway_url, token)
    export = {"dataset": "jobs", "format": "jsonl"}
    reply = holder.submit("DATA_EXPORT", export)
    assert reply.status == 403 and "admin" in reply.json["detail"], reply.body
    made = api.wait_status(api.submit("DATA_EXPORT", export).json["job_id"])
    assert made["status"] == "COMPLETED"
    refused = holder.request("GET", f"/jobs/{made['job_id']}/artifact")
    assert refused.status == 403 and "admin" in refused.json["detail"], refused.body
    assert api.request("GET", f"/jobs/{made['job_id']}/artifact").status == 200


def test_a_revoked_token_is_refused_within_the_auth_cache_time(api, stack):
    token_id, token = make_token(api, "short-lived", "jobs:read")
    holder = Api(stack.gateway_url, token)
    assert holder.request("GET", "/jobs?limit=1").status == 200
    listed = api.request("GET", "/tokens").json["items"]
    mine = next(t for t in listed if t["id"] == token_id)
    assert "token" not in mine and "secret_hash" not in mine
    assert api.request("DELETE", f"/tokens/{token_id}").status == 204
    # Each process trusts a verified token for JOBS_AUTH_CACHE_SECONDS (2 s) at most.
    wait_for(lambda: holder.request("GET", "/jobs?limit=1").status == 401, 6,
             "the revoked token to be refused")
    assert holder.request("GET", "/jobs/" + str(uuid.uuid4())).status == 401
    assert api.request("DELETE", f"/tokens/{token_id}").status == 404


def test_an_expired_token_is_refused(api, stack):
    soon = datetime.now(UTC) + timedelta(seconds=2)
    _, token = make_token(api, "expiring", "jobs:read", expires_at=soon.isoformat())
    holder = Api(stack.gateway_url, token)
    wait_for(lambda: holder.request("GET", "/jobs?limit=1").status == 401, 15,
             "the token to expire")


def test_a_token_request_with_an_unknown_scope_is_a_422_naming_it(api):
    reply = api.request("POST", "/tokens", json_body={"name": "x", "scopes": ["root"]})
    assert reply.status == 422 and reply.json["errors"][0]["loc"][0] == "scopes", reply.body


def test_the_functions_behind_the_gateway_check_tokens_too(stack):
    for function, path in [("status", "/jobs"), ("submit", "/jobs")]:
        direct = Api(stack.function_url(function))
        method = "GET" if function == "status" else "POST"
        reply = direct.request(method, path, json_body={"job_type": "ECHO", "payload": {}})
        assert reply.status == 401, (function, reply.body)


def test_metrics_take_the_scrape_token_and_nothing_less(api, stack):
    scrape = Api(stack.gateway_url, stack.env["JOBS_METRICS_TOKEN"])
    assert scrape.request("GET", "/metrics").status == 200
    assert scrape.request("GET", "/jobs").status == 401  # it opens /metrics only
    _, token = make_token(api, "reader2", "jobs:read")
    assert Api(stack.gateway_url, token).request("GET", "/metrics").status == 403


def test_a_deployment_makes_its_first_admin_token_with_infra_admin_token(stack):
    env = {**os.environ, "DATABASE_URL": stack.env["DATABASE_URL"]}
    made = subprocess.run([sys.executable, "-m", "infra.admin_token", "--name", "deploy"],
                          capture_output=True, text=True, timeout=60, env=env, check=True)
    token = made.stdout.strip()
    holder = Api(stack.gateway_url, token)
    assert holder.request("GET", "/whoami").json == {"name": "deploy", "scopes": ["admin"]}
    assert holder.request("GET", "/tokens").status == 200
