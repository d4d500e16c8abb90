"""Completion callbacks: signed CloudEvents POSTed to allow-listed hosts, on the real stack.

The stack of tests/conftest.py allows 127.0.0.1 and signs with CALLBACK_SECRET."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from common.callbacks import SIGNATURE_HEADER, verify
from tests.conftest import CALLBACK_SECRET
from tests.integration.test_cli import jobs  # noqa: F401 - the CLI runner fixture
from tests.support.client import wait_for

pytestmark = pytest.mark.integration


class Receiver:
    """An HTTP server on 127.0.0.1 that records what is POSTed to it and answers with the
    next of `answers` (then 204)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"path": self.path, "headers": self.headers,
                                          "body": body})
                self.send_response(receiver.answers.pop(0) if receiver.answers else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        return [r for r in self.received if json.loads(r["body"])["subject"] == job_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_a_completed_job_is_posted_as_a_signed_cloudevent(api, receiver):
    job = api.submit("ECHO", {"message": "hi"}, callback_url=f"{receiver.url}/hook?x=1").json
    # Readers see the origin only: a webhook URL's path or query is often its secret.
    assert job["callback_url"] == f"{receiver.url}/…"
    (got,) = wait_for(lambda: receiver.for_job(job["job_id"]), 20, "the callback")
    assert got["path"] == "/hook?x=1"
    assert got["headers"]["Content-Type"].startswith("application/cloudevents+json")
    assert verify(CALLBACK_SECRET, got["headers"][SIGNATURE_HEADER], got["body"])
    assert not verify("another-secret", got["headers"][SIGNATURE_HEADER], got["body"])
    assert not verify(CALLBACK_SECRET, got["headers"][SIGNATURE_HEADER], got["body"] + b" ")
    event = json.loads(got["body"])
    assert event["specversion"] == "1.0" and event["type"] == "jobs.job.completed"
    assert event["data"]["status"] == "COMPLETED"
    assert event["data"]["result"] == {"echo": "hi", "attempt": 1}
    deliveries = wait_for(lambda: (items := api.request(
        "GET", f"/jobs/{job['job_id']}/callbacks").json["items"])
        and items[0]["state"] == "DELIVERED" and items, 10, "the delivery to be recorded")
    (delivery,) = deliveries
    assert delivery["callback_id"] == event["id"] and delivery["url"] == f"{receiver.url}/…"
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 204)]


def test_a_failed_delivery_is_retried_and_each_try_recorded(api, receiver):
    receiver.answers = [500, 503]
    job = api.submit("PERMANENT_FAIL", callback_url=receiver.url).json
    wait_for(lambda: len(receiver.for_job(job["job_id"])) == 3, 30, "three tries")
    event_ids = {json.loads(r["body"])["id"] for r in receiver.for_job(job["job_id"])}
    assert len(event_ids) == 1  # one event, tried three times: receivers can deduplicate
    assert json.loads(receiver.received[-1]["body"])["type"] == "jobs.job.dead_lettered"
    (delivery,) = wait_for(lambda: (items := api.request(
        "GET", f"/jobs/{job['job_id']}/callbacks").json["items"])
        and items[0]["state"] == "DELIVERED" and items, 10, "the delivery to be recorded")
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 204]
    assert delivery["attempts"][0]["error"] == "answered 500"


def test_a_receiver_that_never_answers_well_ends_failed(api, receiver):
    receiver.answers = [500, 500, 500, 500]
    job = api.submit("ECHO", {"message": "x"}, callback_url=receiver.url).json
    (delivery,) = wait_for(lambda: (items := api.request(
        "GET", f"/jobs/{job['job_id']}/callbacks").json["items"])
        and items[0]["state"] == "FAILED" and items, 30, "the delivery to fail")
    assert len(delivery["attempts"]) == 3  # JOBS_CALLBACK_MAX_ATTEMPTS of the test stack


def test_a_cancelled_job_is_called_back_too(api, receiver):
    job = api.submit("ECHO", {"message": "x"}, callback_url=receiver.url,
                     run_at="2100-01-01T00:00:00Z").json
    assert api.request("POST", f"/jobs/{job['job_id']}/cancel").status == 202
    (got,) = wait_for(lambda: receiver.for_job(job["job_id"]), 20, "the callback")
    assert json.loads(got["body"])["type"] == "jobs.job.cancelled"


@pytest.mark.parametrize("url,words", [
    ("http://example.com/hook", "not in JOBS_CALLBACK_ALLOWED_HOSTS"),
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://[fe80::1]/x", "link-local"),
    ("http://metadata.google.internal/", "metadata"),
    ("ftp://127.0.0.1/x", "http:// or https://"),
    ("http://user:pw@127.0.0.1/x", "credentials"),
    ("not a url", "spaces or control characters"),
    ("http://127.0.0.1/hook\r\nX-Evil: 1", "control characters"),
])
def test_callbacks_to_other_hosts_are_refused_at_submit(api, url, words):
    reply = api.submit("ECHO", {"message": "x"}, callback_url=url)
    assert reply.status == 422, reply.body
    assert words in reply.json["detail"]


def test_the_cli_shows_each_try(jobs, api, receiver):  # noqa: F811 - the fixture
    receiver.answers = [502]
    job = api.submit("ECHO", {"message": "x"}, callback_url=receiver.url).json
    wait_for(lambda: len(receiver.for_job(job["job_id"])) == 2, 20, "two tries")
    shown = wait_for(lambda: (r := jobs("callbacks", job["job_id"])).returncode == 0
                     and "DELIVERED" in r.stdout and r.stdout, 10, "the CLI to show it")
    assert "answered 502" in shown and "jobs.job.completed" in shown
