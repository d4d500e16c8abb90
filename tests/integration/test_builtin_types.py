"""Each built-in job type end to end on the real stack: a real file, a real e-mail."""

from __future__ import annotations

import csv
import email
import email.policy
import hashlib
import io
import json
import uuid
from datetime import datetime
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
    assert job["result"]["artifact"] == f"jobs-{job['job_id'][:8]}.jsonl"
    assert job["progress"] == 1.0


def test_an_exported_job_carries_the_api_documents_names_and_values(api):
    marker = f"export-names-{uuid.uuid4()}"
    echo = api.wait_status(api.submit("ECHO", {"message": marker}).json["job_id"])
    job = api.wait_status(api.submit("DATA_EXPORT", {
        "dataset": "jobs", "format": "jsonl",
        "filters": {"job_type": ["ECHO"], "created_after": echo["created_at"]}}).json["job_id"])
    assert job["status"] == "COMPLETED", job["error_message"]
    body = api.request("GET", f"/jobs/{job['job_id']}/artifact")
    [line] = [json.loads(x) for x in body.body.decode().splitlines()
              if json.loads(x)["job_id"] == echo["job_id"]]
    document = api.job(echo["job_id"])

    assert set(line) <= set(document)  # payload and result, not payload_json, result_json
    assert {"payload", "result", "submitted_by"} <= set(line)
    assert line["submitted_by"] == document["submitted_by"] is not None
    for key, value in line.items():
        if key.endswith("_at"):
            assert datetime.fromisoformat(value) == datetime.fromisoformat(document[key]), key
        else:
            assert value == document[key], key


def test_two_reports_download_under_names_of_their_own(api):
    names = []
    for title in ("first", "second"):
        job = api.wait_status(api.submit("REPORT_GENERATION", {
            "title": title, "columns": ["a"], "rows": [[1]], "format": "pdf"}).json["job_id"])
        assert job["status"] == "COMPLETED", job["error_message"]
        reply = api.request("GET", f"/jobs/{job['job_id']}/artifact")
        disposition = reply.headers["content-disposition"]
        assert disposition == f"attachment; filename=report-{job['job_id'][:8]}.pdf"
        assert job["result"]["artifact"] == f"report-{job['job_id'][:8]}.pdf"
        names.append(disposition)
    assert names[0] != names[1]  # a second `curl -OJ` into the same folder works


def test_a_large_report_shows_its_progress_up_to_one(api):
    rows = [[f"row {i}", i] for i in range(12_000)]
    job = api.wait_status(api.submit("REPORT_GENERATION", {
        "title": "Big", "columns": ["name", "n"], "rows": rows, "format": "csv"}).json["job_id"])
    assert job["status"] == "COMPLETED", job["error_message"]
    assert job["progress"] == 1.0
    assert job["progress_message"] == "report ready: 12,000 rows"


def test_a_csv_report_cell_that_would_run_as_a_formula_downloads_quoted(api):
    job = api.wait_status(api.submit("REPORT_GENERATION", {
        "title": "t", "columns": ["cell", "n"], "rows": [["=1+1", -5], ["@cmd", -3.2]],
        "format": "csv"}).json["job_id"])
    body = api.request("GET", f"/jobs/{job['job_id']}/artifact")
    parsed = list(csv.reader(io.StringIO(body.body.decode())))
    assert parsed == [["cell", "n"], ["'=1+1", "-5"], ["'@cmd", "-3.2"]]


@pytest.mark.parametrize(("payload", "loc"), [
    ({"to": ["billing@partner.example <ap@partner.example>"]}, ["to", 0]),
    ({"to": ["ok@example.com", "Ann <a@example.com>, Bob <b@example.com>"]}, ["to", 1]),
    ({"cc": ["Ann\u2028Lee <a@example.com>"]}, ["cc", 0]),
    ({"reply_to": "Help <help@example.com> <other@example.com>"}, ["reply_to"]),
    ({"subject": "Report\vready"}, ["subject"]),
    ({"subject": "Report\x85ready"}, ["subject"]),
    ({"subject": "Report\u2028ready"}, ["subject"]),
    ({"subject": "Report\x1cready"}, ["subject"]),
])
def test_an_email_that_could_not_go_where_it_says_is_refused_at_submit_naming_the_field(
        api, payload, loc):
    reply = api.submit("EMAIL_SENDING", {
        "to": ["ada@example.com"], "subject": "Hi", "text": "x", **payload})
    assert reply.status == 422, reply.body
    assert [error["loc"] for error in reply.json["errors"]] == [loc]


def test_an_export_of_a_dataset_outside_the_allow_list_is_refused_at_submit(api):
    reply = api.submit("DATA_EXPORT", {"dataset": "pg_authid"})
    assert reply.status == 422 and "dataset" in reply.body.decode()
