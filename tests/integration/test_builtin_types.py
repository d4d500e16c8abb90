"""Each built-in job type end to end on the real stack: a real file, a real e-mail."""

from __future__ import annotations

import csv
import email
import email.policy
import hashlib
import io
import json
import uuid
from pathlib import Path

import pytest
from pypdf import PdfReader

from tests.support.client import wait_for

pytestmark = pytest.mark.integration


def test_a_pdf_report_is_downloadable_and_shows_its_rows(api):
    payload = {"title": "Quarterly sales", "columns": ["region", "total"],
               "rows": [["north", 120], ["south", 80.5], ["zürich", None]], "format": "pdf"}
    job = api.wait_status(api.submit("REPORT_GENERATION", payload).json["job_id"])
    assert job["status"] == "COMPLETED", job["error_message"]
    result = job["result"]
    download = api.request("GET", f"/jobs/{job['job_id']}/artifact")
    assert download.status == 200 and download.content_type == "application/pdf"
    assert len(download.body) == result["bytes"]
    assert hashlib.sha256(download.body).hexdigest() == result["sha256"]
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(download.body)).pages)
    for expected in ("Quarterly sales", "north", "120", "south", "80.5", "zürich"):
        assert expected in text


def test_a_csv_report_reparses_to_the_submitted_rows(api):
    rows = [["a", 1], ["b, with comma", 2]]
    job = api.wait_status(api.submit("REPORT_GENERATION", {
        "title": "t", "columns": ["name", "n"], "rows": rows, "format": "csv"}).json["job_id"])
    body = api.request("GET", f"/jobs/{job['job_id']}/artifact")
    assert body.content_type == "text/csv"
    parsed = list(csv.reader(io.StringIO(body.body.decode())))
    assert parsed == [["name", "n"], ["a", "1"], ["b, with comma", "2"]]


def test_an_artifact_of_a_job_without_one_is_a_404(api):
    job = api.wait_status(api.submit("ECHO", {"message": "no file"}).json["job_id"])
    reply = api.request("GET", f"/jobs/{job['job_id']}/artifact")
    assert reply.status == 404 and reply.content_type == "application/problem+json"


def test_an_email_job_really_goes_through_smtp(api, stack):
    subject = f"Report ready {uuid.uuid4()}"
    job = api.wait_status(api.submit("EMAIL_SENDING", {
        "to": ["ada@example.com"], "subject": subject, "text": "plain body",
        "html": "<p>html body</p>"}).json["job_id"])
    assert job["status"] == "COMPLETED", job["error_message"]
    maildir = Path(stack.data_dir) / "mail"

    def received():
        for path in maildir.glob("*.eml"):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if msg["Subject"] == subject:
                return msg
        return None

    msg = wait_for(received, 10, "the mail to land in the SMTP sink")
    assert msg["To"] == "ada@example.com" and job["job_id"] in msg["Message-ID"]
    assert msg.get_body(("plain",)).get_content().strip() == "plain body"
    assert "html body" in msg.get_body(("html",)).get_content()


def test_a_refused_recipient_dead_letters_the_email_without_retries(api):
    job = api.wait_status(api.submit("EMAIL_SENDING", {
        "to": ["reject-me@example.com"], "subject": "nope", "text": "x"}).json["job_id"])
    assert job["status"] == "DEAD_LETTER" and job["retries"] == 0
    assert "550" in job["error_message"]


def test_a_data_export_streams_the_jobs_table_to_json_lines(api):
    marker = f"export-{uuid.uuid4()}"
    ids = {api.submit("ECHO", {"message": marker}).json["job_id"] for _ in range(3)}
    for job_id in ids:
        api.wait_status(job_id)
    job = api.wait_status(api.submit("DATA_EXPORT", {
        "dataset": "jobs", "format": "jsonl",
        "filters": {"job_type": ["ECHO"], "status": ["COMPLETED"]}}).json["job_id"])
    assert job["status"] == "COMPLETED", job["error_message"]
    body = api.request("GET", f"/jobs/{job['job_id']}/artifact")
    lines = [json.loads(line) for line in body.body.decode().splitlines()]
    assert len(lines) == job["result"]["rows"]
    assert ids <= {line["job_id"] for line in lines}
    assert {line["status"] for line in lines} == {"COMPLETED"}


def test_an_export_of_a_dataset_outside_the_allow_list_is_refused_at_submit(api):
    reply = api.submit("DATA_EXPORT", {"dataset": "pg_authid"})
    assert reply.status == 422 and "dataset" in reply.body.decode()
